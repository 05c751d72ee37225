//! The `Range` request header: the single-range subset of RFC 9110 §14.
//!
//! Served: `bytes=a-b`, `bytes=a-` and `bytes=-n`. Several ranges, other
//! units and malformed values are ignored, which the RFC allows: the whole
//! file is sent with 200. A well-formed range that misses the file is
//! unsatisfiable (416).

/// What a `Range` header asks of a file of known size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Range {
    /// The whole file, with 200: no header, or one this server does not serve.
    Full,
    /// Bytes `start..=end` of the file, with 206. Invariant: `start <= end < size`.
    Part {
        /// First byte sent.
        start: u64,
        /// Last byte sent (inclusive, as in `Content-Range`).
        end: u64,
    },
    /// No byte of the file is in the range: 416.
    Unsatisfiable,
}

impl Range {
    /// Reads a `Range` header value against a file of `size` bytes.
    pub fn parse(header: Option<&str>, size: u64) -> Range {
        let Some(spec) = header.and_then(|h| strip_prefix_ignore_case(h.trim(), "bytes=")) else {
            return Range::Full;
        };
        if spec.contains(',') {
            return Range::Full;
        }
        let Some((first, last)) = spec.trim().split_once('-') else {
            return Range::Full;
        };
        match (first.trim(), last.trim()) {
            ("", suffix) => match number(suffix) {
                // `bytes=-0` and any suffix of an empty file select nothing.
                Some(0) => Range::Unsatisfiable,
                Some(_) if size == 0 => Range::Unsatisfiable,
                Some(n) => Range::Part {
                    start: size - n.min(size),
                    end: size - 1,
                },
                None => Range::Full,
            },
            (first, "") => match number(first) {
                Some(a) if a >= size => Range::Unsatisfiable,
                Some(a) => Range::Part {
                    start: a,
                    end: size - 1,
                },
                None => Range::Full,
            },
            (first, last) => match (number(first), number(last)) {
                (Some(a), Some(b)) if a <= b => {
                    if a >= size {
                        Range::Unsatisfiable
                    } else {
                        Range::Part {
                            start: a,
                            end: b.min(size - 1),
                        }
                    }
                }
                _ => Range::Full,
            },
        }
    }
}

/// A decimal byte position: ASCII digits only (no sign, no spaces); `None`
/// also when it does not fit a `u64`.
fn number(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn strip_prefix_ignore_case<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &s[prefix.len()..])
}

#[cfg(test)]
mod tests {
    use super::Range;

    fn part(start: u64, end: u64) -> Range {
        Range::Part { start, end }
    }

    #[test]
    fn single_ranges() {
        assert_eq!(Range::parse(Some("bytes=0-0"), 10), part(0, 0));
        assert_eq!(Range::parse(Some("bytes=2-5"), 10), part(2, 5));
        assert_eq!(Range::parse(Some("bytes=2-"), 10), part(2, 9));
        assert_eq!(Range::parse(Some("bytes=-3"), 10), part(7, 9));
        assert_eq!(Range::parse(Some("BYTES=1-1"), 10), part(1, 1));
        assert_eq!(Range::parse(Some(" bytes= 1 - 2 "), 10), part(1, 2));
    }

    #[test]
    fn clamped_to_the_file() {
        assert_eq!(Range::parse(Some("bytes=5-100"), 10), part(5, 9));
        assert_eq!(Range::parse(Some("bytes=-100"), 10), part(0, 9));
        assert_eq!(
            Range::parse(Some("bytes=0-18446744073709551615"), 10),
            part(0, 9)
        );
    }

    #[test]
    fn unsatisfiable() {
        assert_eq!(Range::parse(Some("bytes=10-"), 10), Range::Unsatisfiable);
        assert_eq!(Range::parse(Some("bytes=10-20"), 10), Range::Unsatisfiable);
        assert_eq!(Range::parse(Some("bytes=-0"), 10), Range::Unsatisfiable);
        assert_eq!(Range::parse(Some("bytes=0-0"), 0), Range::Unsatisfiable);
        assert_eq!(Range::parse(Some("bytes=-5"), 0), Range::Unsatisfiable);
    }

    #[test]
    fn ignored_means_full() {
        for h in [
            "bytes=0-1,3-4",
            "items=0-1",
            "bytes=5-2",
            "bytes=+1-2",
            "bytes=-",
            "bytes=a-b",
            "bytes=1",
            "bytes=99999999999999999999-",
            "bytes",
            "",
            "bytés=0-1",
        ] {
            assert_eq!(Range::parse(Some(h), 10), Range::Full, "{h:?}");
        }
        assert_eq!(Range::parse(None, 10), Range::Full);
    }
}
