//! `Strict`, a serde `Deserializer` over a parsed `serde_json::Value` that reads structs only
//! from JSON objects and lists only from arrays, and refuses array elements a visitor left
//! unread, with the field helpers that give optional fields valita's meaning. See
//! [`super::messages`] for why serde's stock deserializers will not do: zero-cache validates
//! with valita in its strict mode, and so must we.

use std::fmt;

use serde::de::value::BorrowedStrDeserializer;
use serde::de::{
    self, DeserializeSeed, Deserializer, IntoDeserializer, MapAccess, SeqAccess, Unexpected,
    Visitor,
};
use serde::Deserialize;
use serde_json::Value;

/// Reads an optional field that, when present, must hold a `T` (valita's
/// `.optional()` refuses `null`). Use with `#[serde(default)]`.
pub(super) fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Option<T>, D::Error> {
    match Option::<T>::deserialize(d)? {
        Some(value) => Ok(Some(value)),
        None => Err(de::Error::invalid_type(
            Unexpected::Other("null"),
            &"a value (leave the key out instead)",
        )),
    }
}

/// Like [`present`], for opaque values the schema requires to be objects.
pub(super) fn present_object<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    match Value::deserialize(d)? {
        value @ Value::Object(_) => Ok(Some(value)),
        other => Err(de::Error::custom(format!("expected an object, got {}", json_type(&other)))),
    }
}

/// Reads a field that must be present but may be `null` (without a
/// `deserialize_with`, serde would treat a missing `Option` as `None`).
pub(super) fn nullable<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Option<T>, D::Error> {
    Option::<T>::deserialize(d)
}

/// A JSON type's name, for error messages.
pub(super) fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Deserializes a `T` from `value` through [`Strict`].
pub(super) fn decode<'a, T: Deserialize<'a>>(value: &'a Value) -> Result<T, DecodeError> {
    T::deserialize(Strict(value))
}

/// Why a value did not fit its struct, and where.
#[derive(Debug)]
pub(super) struct DecodeError {
    /// serde's (or our) description of the problem.
    message: String,
    /// Keys and indexes from the problem up to the body, innermost first:
    /// each level adds its own while the error travels up.
    path: Vec<String>,
}

impl DecodeError {
    /// An error at the current level, with no path yet.
    pub(super) fn new(message: impl Into<String>) -> Self {
        DecodeError { message: message.into(), path: Vec::new() }
    }

    /// Records that the error happened inside `segment`.
    pub(super) fn inside(mut self, segment: impl fmt::Display) -> Self {
        self.path.push(segment.to_string());
        self
    }
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        if !self.path.is_empty() {
            let mut path = self.path.iter().rev();
            write!(f, " at {}", path.next().expect("path is not empty"))?;
            for segment in path {
                write!(f, ".{segment}")?;
            }
        }
        Ok(())
    }
}

impl std::error::Error for DecodeError {}

impl de::Error for DecodeError {
    fn custom<T: fmt::Display>(message: T) -> Self {
        DecodeError::new(message.to_string())
    }
}

/// A serde `Deserializer` over a parsed JSON value that only lets JSON
/// objects become structs and maps and only arrays become lists, and that
/// refuses arrays with elements left over (see the module documentation).
struct Strict<'de>(&'de Value);

impl Strict<'_> {
    /// The value as serde's `Unexpected`, for type errors.
    fn unexpected(&self) -> Unexpected<'_> {
        match self.0 {
            Value::Null => Unexpected::Other("null"),
            Value::Bool(b) => Unexpected::Bool(*b),
            Value::Number(n) => match (n.as_u64(), n.as_i64(), n.as_f64()) {
                (Some(u), _, _) => Unexpected::Unsigned(u),
                (None, Some(i), _) => Unexpected::Signed(i),
                (None, None, f) => Unexpected::Float(f.unwrap_or(f64::NAN)),
            },
            Value::String(s) => Unexpected::Str(s),
            Value::Array(_) => Unexpected::Seq,
            Value::Object(_) => Unexpected::Map,
        }
    }
}

/// Deserializer methods for types that are never null: they name a null
/// as such, then read the value like `deserialize_any`.
macro_rules! deserialize_non_null {
    ($($method:ident)*) => {$(
        fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DecodeError> {
            match self.0 {
                Value::Null => Err(de::Error::invalid_type(self.unexpected(), &visitor)),
                _ => self.deserialize_any(visitor),
            }
        }
    )*};
}

impl<'de> Deserializer<'de> for Strict<'de> {
    type Error = DecodeError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DecodeError> {
        match self.0 {
            Value::Null => visitor.visit_unit(),
            Value::Bool(b) => visitor.visit_bool(*b),
            Value::Number(n) => match (n.as_u64(), n.as_i64(), n.as_f64()) {
                (Some(u), _, _) => visitor.visit_u64(u),
                (None, Some(i), _) => visitor.visit_i64(i),
                (None, None, Some(f)) => visitor.visit_f64(f),
                (None, None, None) => Err(de::Error::custom("unrepresentable number")),
            },
            Value::String(s) => visitor.visit_borrowed_str(s),
            Value::Array(elements) => visit_array(elements, visitor),
            Value::Object(entries) => {
                visitor.visit_map(ObjectReader { entries: entries.iter(), pending: None })
            }
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DecodeError> {
        match self.0 {
            Value::Null => visitor.visit_none(),
            _ => visitor.visit_some(self),
        }
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DecodeError> {
        self.deserialize_map(visitor)
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DecodeError> {
        match self.0 {
            Value::Object(_) => self.deserialize_any(visitor),
            _ => Err(de::Error::invalid_type(self.unexpected(), &visitor)),
        }
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DecodeError> {
        match self.0 {
            Value::Array(_) => self.deserialize_any(visitor),
            _ => Err(de::Error::invalid_type(self.unexpected(), &visitor)),
        }
    }

    fn deserialize_tuple<V: Visitor<'de>>(
        self,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, DecodeError> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, DecodeError> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, DecodeError> {
        visitor.visit_newtype_struct(self)
    }

    /// Only unit variants, written as strings: the literal-union fields
    /// (`op`, `type`) of the protocol.
    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DecodeError> {
        match self.0 {
            Value::String(s) => visitor.visit_enum(s.as_str().into_deserializer()),
            _ => Err(de::Error::invalid_type(self.unexpected(), &visitor)),
        }
    }

    // Scalars: serde's visitors would call a null a "unit value".
    deserialize_non_null! {
        deserialize_bool deserialize_i8 deserialize_i16 deserialize_i32 deserialize_i64
        deserialize_i128 deserialize_u8 deserialize_u16 deserialize_u32 deserialize_u64
        deserialize_u128 deserialize_f32 deserialize_f64 deserialize_char deserialize_str
        deserialize_string deserialize_bytes deserialize_byte_buf
    }

    serde::forward_to_deserialize_any! {
        unit unit_struct identifier ignored_any
    }
}

/// Hands the elements of `elements` to `visitor`, then refuses any it did
/// not take.
fn visit_array<'de, V: Visitor<'de>>(
    elements: &'de [Value],
    visitor: V,
) -> Result<V::Value, DecodeError> {
    let mut reader = ArrayReader { elements: elements.iter().enumerate() };
    let value = visitor.visit_seq(&mut reader)?;
    match reader.elements.len() {
        0 => Ok(value),
        left => Err(de::Error::custom(format!(
            "expected an array of {} elements, got {}",
            elements.len() - left,
            elements.len()
        ))),
    }
}

/// serde's view of a JSON array, element by element.
struct ArrayReader<'de> {
    /// The elements not yet read, with their indexes for error paths.
    elements: std::iter::Enumerate<std::slice::Iter<'de, Value>>,
}

impl<'de> SeqAccess<'de> for ArrayReader<'de> {
    type Error = DecodeError;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, DecodeError> {
        match self.elements.next() {
            Some((index, element)) => {
                seed.deserialize(Strict(element)).map(Some).map_err(|e| e.inside(index))
            }
            None => Ok(None),
        }
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.elements.len())
    }
}

/// serde's view of a JSON object, entry by entry.
struct ObjectReader<'de> {
    /// The entries not yet read.
    entries: serde_json::map::Iter<'de>,
    /// The entry whose key serde has read and whose value it reads next.
    pending: Option<(&'de str, &'de Value)>,
}

impl<'de> MapAccess<'de> for ObjectReader<'de> {
    type Error = DecodeError;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, DecodeError> {
        let Some((key, value)) = self.entries.next() else {
            return Ok(None);
        };
        self.pending = Some((key.as_str(), value));
        seed.deserialize(BorrowedStrDeserializer::new(key.as_str())).map(Some)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(
        &mut self,
        seed: V,
    ) -> Result<V::Value, DecodeError> {
        let (key, value) =
            self.pending.take().ok_or_else(|| de::Error::custom("value read before its key"))?;
        seed.deserialize(Strict(value)).map_err(|e| e.inside(key))
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.entries.len())
    }
}
