//! The one table of numbers in protocol v1: frame kinds, field tags, status
//! codes and error codes. Everything else refers to these by name.

use std::fmt;

/// Declares a `u8`/`u16` newtype with named constants, a `name()` lookup and a
/// `Debug` impl that falls back to `<unknown 0x..>` for numbers not in the table.
macro_rules! code_table {
    ($(#[$meta:meta])* $ty:ident($repr:ty) { $($(#[$cmeta:meta])* $name:ident = $val:expr,)* }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $ty(pub $repr);

        impl $ty {
            $($(#[$cmeta])* pub const $name: $ty = $ty($val);)*

            /// Every value in the table, in declaration order.
            pub const ALL: &'static [$ty] = &[$($ty::$name,)*];

            /// The table name, or `None` for a number the table does not know.
            pub fn name(self) -> Option<&'static str> {
                match self.0 {
                    $($val => Some(stringify!($name)),)*
                    _ => None,
                }
            }
        }

        impl fmt::Debug for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                match self.name() {
                    Some(name) => f.write_str(name),
                    None => write!(f, "<unknown {:#04x}>", self.0),
                }
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(self, f)
            }
        }
    };
}

code_table! {
    /// The first byte of a frame.
    Kind(u8) {
        HELLO = 0x01,
        SEND = 0x02,
        ACK = 0x03,
        READ = 0x04,
        PING = 0x05,
        BYE = 0x06,
        WELCOME = 0x81,
        STATUS = 0x82,
        MSG = 0x83,
        ERROR = 0x84,
        PONG = 0x85,
    }
}

code_table! {
    /// The first byte of a field inside a frame body.
    Tag(u8) {
        ID = 0x01,
        TO = 0x02,
        GROUP = 0x03,
        FROM = 0x04,
        EXPIRY = 0x05,
        TYPE = 0x06,
        PRIORITY = 0x07,
        FLAGS = 0x08,
        PAYLOAD = 0x09,
        SEQ = 0x0A,
        TIME = 0x0B,
        STATUS = 0x0C,
        TOKEN = 0x0D,
        VERSION = 0x0E,
        CODE = 0x0F,
        REASON = 0x10,
        MAX_FRAME = 0x11,
        MEMBER = 0x12,
        CLIENT = 0x13,
        KEEPALIVE = 0x14,
        ADDRESS = 0x15,
    }
}

code_table! {
    /// The STATUS field: what became of a message the user sent.
    StatusCode(u8) {
        SENT = 1,
        DELIVERED = 2,
        READ = 3,
        INVALID_DEST = 64,
        EXPIRED = 65,
        OFFLINE = 66,
        TOO_LARGE = 67,
        NOT_MEMBER = 68,
        BAD_REQUEST = 69,
        OVERLOADED = 70,
        DELETED = 71,
    }
}

code_table! {
    /// The CODE field of an ERROR frame. Every error is fatal.
    ErrorCode(u16) {
        PROTOCOL_ERROR = 1,
        AUTH_FAILED = 2,
        FRAME_TOO_LARGE = 3,
        NOT_AUTHENTICATED = 4,
        IDLE_TIMEOUT = 5,
        SHUTDOWN = 6,
        REPLACED = 7,
        UNSUPPORTED_VERSION = 8,
    }
}

/// The wire type of a field's value, which fixes how its bytes are checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FieldType {
    U8,
    U16,
    U32,
    U64,
    /// UTF-8 text.
    Str,
    /// Opaque bytes.
    Bytes,
}

impl FieldType {
    /// The exact `flen` an integer field must have; `None` for strings and bytes.
    pub fn width(self) -> Option<usize> {
        match self {
            FieldType::U8 => Some(1),
            FieldType::U16 => Some(2),
            FieldType::U32 => Some(4),
            FieldType::U64 => Some(8),
            FieldType::Str | FieldType::Bytes => None,
        }
    }
}

impl Tag {
    /// The value type of a known tag; `None` for tags this version does not know
    /// (those are skipped by the decoder).
    pub fn field_type(self) -> Option<FieldType> {
        use FieldType::*;
        Some(match self {
            Tag::ID | Tag::SEQ | Tag::TIME => U64,
            Tag::EXPIRY | Tag::TYPE | Tag::FLAGS | Tag::MAX_FRAME | Tag::KEEPALIVE => U32,
            Tag::PRIORITY | Tag::STATUS | Tag::VERSION => U8,
            Tag::CODE => U16,
            Tag::TO
            | Tag::GROUP
            | Tag::FROM
            | Tag::TOKEN
            | Tag::REASON
            | Tag::MEMBER
            | Tag::CLIENT
            | Tag::ADDRESS => Str,
            Tag::PAYLOAD => Bytes,
            _ => return None,
        })
    }
}

/// FLAGS bits.
pub mod flags {
    /// The sender wants a DELIVERED status.
    pub const DELIVERY_RECEIPT: u32 = 0x001;
    /// The sender wants a READ status.
    pub const READ_RECEIPT: u32 = 0x002;
    /// Set by the server: this SEQ may have been delivered to this user before.
    pub const REDELIVERY: u32 = 0x100;
    /// FLAGS of a SEND that carries no FLAGS field.
    pub const SEND_DEFAULT: u32 = DELIVERY_RECEIPT | READ_RECEIPT;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_names_and_unknown_fallback() {
        assert_eq!(format!("{:?}", Kind::SEND), "SEND");
        assert_eq!(format!("{:?}", Kind(0x7f)), "<unknown 0x7f>");
        assert_eq!(format!("{:?}", StatusCode::OVERLOADED), "OVERLOADED");
        assert_eq!(ErrorCode::REPLACED.0, 7);
    }

    #[test]
    fn every_known_tag_has_a_type() {
        for tag in Tag::ALL {
            assert!(tag.field_type().is_some(), "{tag:?}");
        }
        assert_eq!(Tag(0x7e).field_type(), None);
    }
}
