//! Thumbnails of uploaded images: JPEG, PNG, WebP and GIF (its first
//! frame), at most [`SIDE`] pixels on the longer side, encoded as JPEG.
//!
//! Untrusted input, decoded in three guarded steps:
//!
//! 1. the declared `Content-Type` must be one of the four, and the first
//!    bytes must be that format ([`expected`]): a file that lies about its
//!    type gets no thumbnail;
//! 2. the header alone gives the dimensions, refused above
//!    [`MAX_DIMENSION`] per side or [`MAX_PIXELS`] in all (a decompression
//!    bomb, e.g. a 50,000 × 50,000 PNG of a few KiB, stops here);
//! 3. the decoder runs with `image::Limits` ([`MAX_ALLOC`]), and at most
//!    [`DECODERS`] decodes run at once, so pixel buffers hold at most
//!    `DECODERS × MAX_ALLOC` bytes.
//!
//! Every refusal is a [`Refused`] value: the file is stored all the same,
//! without a thumbnail. Nothing here panics on bad input.

use std::fs::File;
use std::io::{self, BufReader, Cursor};
use std::path::Path;
use std::sync::{Condvar, Mutex};

use image::codecs::jpeg::JpegEncoder;
use image::{DynamicImage, ImageFormat, ImageReader, Limits, Rgb, RgbImage};

/// The thumbnail's longer side, pixels.
pub const SIDE: u32 = 256;
/// The `Content-Type` of thumbnails.
pub const CONTENT_TYPE: &str = "image/jpeg";
/// Largest width or height decoded.
pub const MAX_DIMENSION: u32 = 12_000;
/// Most pixels decoded (a 24-megapixel camera picture passes).
pub const MAX_PIXELS: u64 = 25_000_000;
/// The decoder's allocation limit, bytes.
pub const MAX_ALLOC: u64 = 128 << 20;
/// Largest image file given to the decoder, bytes; larger ones get no thumbnail.
pub const MAX_INPUT: u64 = 32 << 20;
/// Decodes at once; more wait their turn.
const DECODERS: usize = 2;
/// JPEG quality of thumbnails.
const QUALITY: u8 = 80;

/// Why an image got no thumbnail.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    /// The bytes are not the image format the `Content-Type` names.
    #[error("the content is not {declared} (found {found})")]
    Mismatch {
        /// The declared type.
        declared: String,
        /// What the first bytes say.
        found: String,
    },
    /// The header's dimensions are over the limits.
    #[error("image of {width}x{height} pixels is over the thumbnail limits")]
    TooLarge {
        /// Width from the header.
        width: u32,
        /// Height from the header.
        height: u32,
    },
    /// The file is over [`MAX_INPUT`].
    #[error("image file of {0} bytes is too large for a thumbnail")]
    FileTooLarge(u64),
    /// The decoder refused (malformed, truncated, over its limits).
    #[error("cannot decode the image: {0}")]
    Decode(String),
    /// Reading the stored file failed.
    #[error("cannot read the image: {0}")]
    Io(#[from] io::Error),
}

/// The format a thumbnail is made from for this `Content-Type`, if any.
pub fn expected(content_type: &str) -> Option<ImageFormat> {
    let essence = content_type.split(';').next().unwrap_or("").trim();
    match essence.to_ascii_lowercase().as_str() {
        "image/jpeg" | "image/jpg" | "image/pjpeg" => Some(ImageFormat::Jpeg),
        "image/png" => Some(ImageFormat::Png),
        "image/webp" => Some(ImageFormat::WebP),
        "image/gif" => Some(ImageFormat::Gif),
        _ => None,
    }
}

/// Makes the thumbnail of the image file at `path`, declared as `format`;
/// returns the JPEG bytes.
pub fn make(path: &Path, format: ImageFormat) -> Result<Vec<u8>, Refused> {
    let open = || -> Result<ImageReader<BufReader<File>>, Refused> {
        let file = File::open(path)?;
        let len = file.metadata()?.len();
        if len > MAX_INPUT {
            return Err(Refused::FileTooLarge(len));
        }
        let reader = ImageReader::new(BufReader::new(file)).with_guessed_format()?;
        match reader.format() {
            Some(found) if found == format => Ok(reader),
            found => Err(Refused::Mismatch {
                declared: format!("{format:?}"),
                found: found.map_or("no image".into(), |f| format!("{f:?}")),
            }),
        }
    };
    let header = open()?;
    if format == ImageFormat::Jpeg && !ends_like_jpeg(path)? {
        // The JPEG decoder fills a cut-off picture with grey rather than
        // failing: a file without its end marker is refused here.
        return Err(Refused::Decode(
            "JPEG without its end marker (truncated)".into(),
        ));
    }
    let (width, height) = header
        .into_dimensions()
        .map_err(|e| Refused::Decode(e.to_string()))?;
    if width == 0
        || height == 0
        || width > MAX_DIMENSION
        || height > MAX_DIMENSION
        || u64::from(width) * u64::from(height) > MAX_PIXELS
    {
        return Err(Refused::TooLarge { width, height });
    }
    let mut reader = open()?;
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_DIMENSION);
    limits.max_image_height = Some(MAX_DIMENSION);
    limits.max_alloc = Some(MAX_ALLOC);
    reader.limits(limits);
    let image = {
        let _turn = Turn::take();
        reader
            .decode()
            .map_err(|e| Refused::Decode(e.to_string()))?
    };
    encode(&shrink(&image))
}

/// Whether the last KiB of a JPEG file holds the end-of-image marker
/// `FF D9`, which entropy-coded data can never contain (a `FF` there is
/// always followed by `00`): false for a file cut off before its end.
fn ends_like_jpeg(path: &Path) -> io::Result<bool> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = File::open(path)?;
    let len = file.metadata()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(1024)))?;
    let mut tail = Vec::with_capacity(1024);
    file.take(1024).read_to_end(&mut tail)?;
    Ok(tail.windows(2).any(|w| w == [0xFF, 0xD9]))
}

/// The image scaled to fit [`SIDE`] × [`SIDE`] (never enlarged), on white
/// where it was transparent.
fn shrink(image: &DynamicImage) -> RgbImage {
    let small = if image.width() > SIDE || image.height() > SIDE {
        image.thumbnail(SIDE, SIDE)
    } else {
        image.clone()
    };
    let rgba = small.to_rgba8();
    RgbImage::from_fn(rgba.width(), rgba.height(), |x, y| {
        let [r, g, b, a] = rgba.get_pixel(x, y).0;
        let over_white =
            |c: u8| ((u16::from(c) * u16::from(a) + 255 * (255 - u16::from(a))) / 255) as u8;
        Rgb([over_white(r), over_white(g), over_white(b)])
    })
}

fn encode(image: &RgbImage) -> Result<Vec<u8>, Refused> {
    let mut out = Cursor::new(Vec::new());
    JpegEncoder::new_with_quality(&mut out, QUALITY)
        .encode_image(image)
        .map_err(|e| Refused::Decode(e.to_string()))?;
    Ok(out.into_inner())
}

/// The decodes running now, at most [`DECODERS`].
static RUNNING: Mutex<usize> = Mutex::new(0);
/// Signalled when a decode ends.
static DONE: Condvar = Condvar::new();

/// One of the [`DECODERS`] decoding turns, given back on drop.
struct Turn;

impl Turn {
    fn take() -> Turn {
        let mut n = RUNNING.lock().unwrap_or_else(|e| e.into_inner());
        while *n >= DECODERS {
            n = DONE.wait(n).unwrap_or_else(|e| e.into_inner());
        }
        *n += 1;
        Turn
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        *RUNNING.lock().unwrap_or_else(|e| e.into_inner()) -= 1;
        DONE.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn write(dir: &Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
        let path = dir.join(name);
        std::fs::File::create(&path)
            .unwrap()
            .write_all(bytes)
            .unwrap();
        path
    }

    fn png(width: u32, height: u32) -> Vec<u8> {
        let image = DynamicImage::ImageRgba8(image::RgbaImage::new(width, height));
        let mut out = Cursor::new(Vec::new());
        image.write_to(&mut out, ImageFormat::Png).unwrap();
        out.into_inner()
    }

    #[test]
    fn sizes_and_refusals() {
        let dir = tempfile::tempdir().unwrap();
        let wide = write(dir.path(), "wide.png", &png(1000, 500));
        let thumb = image::load_from_memory(&make(&wide, ImageFormat::Png).unwrap()).unwrap();
        assert_eq!((thumb.width(), thumb.height()), (256, 128));
        let small = write(dir.path(), "small.png", &png(10, 20));
        let thumb = image::load_from_memory(&make(&small, ImageFormat::Png).unwrap()).unwrap();
        assert_eq!((thumb.width(), thumb.height()), (10, 20));
        assert!(matches!(
            make(&small, ImageFormat::Jpeg),
            Err(Refused::Mismatch { .. })
        ));
        let text = write(dir.path(), "text.png", b"hello, not a picture");
        assert!(matches!(
            make(&text, ImageFormat::Png),
            Err(Refused::Mismatch { .. })
        ));
        let bytes = png(300, 300);
        let cut = write(dir.path(), "cut.png", &bytes[..bytes.len() / 2]);
        assert!(matches!(
            make(&cut, ImageFormat::Png),
            Err(Refused::Decode(_))
        ));
        assert_eq!(expected("image/PNG; x=y"), Some(ImageFormat::Png));
        assert_eq!(expected("image/svg+xml"), None);
    }
}
