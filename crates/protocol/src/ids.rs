//! Validated newtypes: a value of one of these types has passed its rules, so code that holds one
//! never re-checks it. Each parses from a string (`parse`) and from JSON (`serde(try_from)`), and
//! each error says which rule was broken.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Why a value was refused. The message is meant for the client: it names the rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidValue(pub(crate) String);

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '-')
}

macro_rules! name_newtype {
    ($(#[$doc:meta])* $name:ident, $what:literal, $max:literal, extra: $extra:expr, alphabet: $alphabet:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Longest accepted value, in characters (all accepted characters are ASCII).
            pub const MAX_LEN: usize = $max;

            /// Checks `value` against the rules.
            ///
            /// # Errors
            /// [`InvalidValue`] naming the broken rule.
            pub fn parse(value: impl Into<String>) -> Result<Self, InvalidValue> {
                let value = value.into();
                let ok_len = !value.is_empty() && value.len() <= $max;
                let extra: &[char] = $extra;
                let ok_chars = value.chars().all(|c| is_name_char(c) || extra.contains(&c));
                if ok_len && ok_chars {
                    Ok(Self(value))
                } else {
                    Err(InvalidValue(format!(
                        concat!($what, " must be 1-", $max, " characters of ", $alphabet, ", got {:?}"),
                        truncate_for_error(&value)
                    )))
                }
            }

            /// The value as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = InvalidValue;
            fn try_from(value: String) -> Result<Self, InvalidValue> {
                Self::parse(value)
            }
        }

        impl From<$name> for String {
            fn from(value: $name) -> String {
                value.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

name_newtype!(
    /// A room name: 1–128 characters of `[A-Za-z0-9_.:-]`.
    ///
    /// The alphabet leaves out `#`, which the writer uses for its bookkeeping keys, so no room can
    /// ever collide with one.
    RoomId, "room", 128, extra: &[], alphabet: "A-Z a-z 0-9 _ . : -"
);

name_newtype!(
    /// A client-chosen message id, the idempotency key of a send: 1–64 characters of
    /// `[A-Za-z0-9_.:-]` (a UUID fits).
    ClientMsgId, "message id", 64, extra: &[], alphabet: "A-Z a-z 0-9 _ . : -"
);

name_newtype!(
    /// Who sent a message: 1–64 characters of `[A-Za-z0-9_.:@-]`. Set by the gateway from the
    /// connection's identity, never taken from a client frame.
    UserId, "user", 64, extra: &['@'], alphabet: "A-Z a-z 0-9 _ . : @ -"
);

fn truncate_for_error(value: &str) -> String {
    const SHOWN: usize = 40;
    if value.chars().count() <= SHOWN {
        value.to_owned()
    } else {
        let head: String = value.chars().take(SHOWN).collect();
        format!("{head}…")
    }
}

/// A message body: UTF-8 text, 1 byte to [`Body::MAX_BYTES`] (16 KiB).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Body(String);

impl Body {
    /// Largest accepted body, in bytes of UTF-8.
    pub const MAX_BYTES: usize = 16 * 1024;

    /// Checks `value` against the rules.
    ///
    /// # Errors
    /// [`InvalidValue`] when the body is empty or longer than [`Body::MAX_BYTES`].
    pub fn parse(value: impl Into<String>) -> Result<Self, InvalidValue> {
        let value = value.into();
        if value.is_empty() {
            return Err(InvalidValue("body must not be empty".into()));
        }
        if value.len() > Self::MAX_BYTES {
            return Err(InvalidValue(format!(
                "body is {} bytes, the limit is {} bytes",
                value.len(),
                Self::MAX_BYTES
            )));
        }
        Ok(Self(value))
    }

    /// The body as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Body {
    type Error = InvalidValue;
    fn try_from(value: String) -> Result<Self, InvalidValue> {
        Self::parse(value)
    }
}

impl From<Body> for String {
    fn from(value: Body) -> String {
        value.0
    }
}

/// How many messages a scrollback (`history`) request asks for: 1 to [`PageLimit::MAX`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "u32", into = "u32")]
pub struct PageLimit(u32);

impl PageLimit {
    /// Most messages one `history` reply holds (fewer when their bytes would overflow the
    /// connection's queue: ask again from the oldest one received).
    pub const MAX: u32 = 100;
    /// What a `history` request without `limit` gets.
    pub const DEFAULT: PageLimit = PageLimit(50);

    /// Checks `value` against the rules.
    ///
    /// # Errors
    /// [`InvalidValue`] when `value` is 0 or above [`PageLimit::MAX`].
    pub fn new(value: u32) -> Result<Self, InvalidValue> {
        if (1..=Self::MAX).contains(&value) {
            Ok(Self(value))
        } else {
            Err(InvalidValue(format!(
                "limit must be 1 to {}, not {value}",
                Self::MAX
            )))
        }
    }

    /// The number of messages.
    pub fn get(self) -> u32 {
        self.0
    }
}

impl Default for PageLimit {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl TryFrom<u32> for PageLimit {
    type Error = InvalidValue;
    fn try_from(value: u32) -> Result<Self, InvalidValue> {
        Self::new(value)
    }
}

impl From<PageLimit> for u32 {
    fn from(value: PageLimit) -> u32 {
        value.0
    }
}

/// A message's position in its room: dense, 1, 2, 3 … with no holes. `Seq(0)` means "before the
/// first message" (an empty room's head, or `since=0`).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Seq(pub u64);

impl Seq {
    /// The seq right after this one.
    #[must_use]
    pub fn next(self) -> Seq {
        Seq(self.0 + 1)
    }
}

impl fmt::Display for Seq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_ids_follow_the_alphabet_and_length() {
        assert!(RoomId::parse("lobby").is_ok());
        assert!(RoomId::parse("team-1:general_v2.0").is_ok());
        assert!(RoomId::parse("a".repeat(128)).is_ok());
        assert!(RoomId::parse("a".repeat(129)).is_err());
        assert!(RoomId::parse("").is_err());
        assert!(RoomId::parse("#head#lobby").is_err());
        assert!(RoomId::parse("with space").is_err());
        assert!(RoomId::parse("émoji").is_err());
        let err = RoomId::parse("bad room").unwrap_err().to_string();
        assert!(err.contains("room must be 1-128 characters"), "{err}");
    }

    #[test]
    fn user_ids_allow_at_sign_but_room_ids_do_not() {
        assert!(UserId::parse("john@example.com").is_ok());
        assert!(RoomId::parse("john@example.com").is_err());
        assert!(UserId::parse("a".repeat(65)).is_err());
    }

    #[test]
    fn bodies_are_bounded_in_bytes_not_chars() {
        assert!(Body::parse("Hello world").is_ok());
        assert!(Body::parse("").is_err());
        assert!(Body::parse("x".repeat(Body::MAX_BYTES)).is_ok());
        assert!(Body::parse("x".repeat(Body::MAX_BYTES + 1)).is_err());
        // 'é' is two bytes: 8193 of them is 16386 bytes.
        assert!(Body::parse("é".repeat(8193)).is_err());
    }

    #[test]
    fn long_values_are_truncated_in_errors() {
        let err = RoomId::parse("!".repeat(1000)).unwrap_err().to_string();
        assert!(err.len() < 200, "{err}");
    }
}
