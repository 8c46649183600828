//! `Strict`, a serde `Deserializer` over one value of simd-json's tape that reads structs only
//! from JSON objects and lists only from arrays, and refuses array elements a visitor left
//! unread, with the field helpers that give optional fields valita's meaning. See
//! [`super::messages`] for why serde's stock deserializers will not do: zero-cache validates
//! with valita in its strict mode, and so must we.
//!
//! Why the tape and not a `serde_json::Value`: a message is read once, into its structs, and
//! the tape (a flat array of nodes whose strings point into the frame) costs a fraction of a
//! tree of maps and strings that would be built, copied out of and dropped again. Only the
//! values the server keeps opaque (rows, query ASTs) become `serde_json::Value`s, built
//! straight from the tape. Objects are read in the order written; of a key written twice,
//! only the last value counts (as with `JSON.parse` in zero-cache). When a message has
//! several faults, the first one in the text is the one reported.

use std::fmt;

use serde::de::value::BorrowedStrDeserializer;
use serde::de::{
    self, DeserializeSeed, Deserializer, IntoDeserializer, MapAccess, SeqAccess, Unexpected,
    Visitor,
};
use serde::Deserialize;
use serde_json::Value;
use simd_json::{Node, StaticNode};

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
pub(super) fn decode<'de, T: Deserialize<'de>>(
    value: TapeValue<'_, 'de>,
) -> Result<T, DecodeError> {
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

/// One JSON value on simd-json's tape: its head node and every node nested in it, so that
/// `nodes.len()` is the value's node count and the next value starts right after it.
#[derive(Clone, Copy)]
pub(super) struct TapeValue<'t, 'de> {
    /// The head node (an object's or array's header, or the scalar itself), then its contents.
    nodes: &'t [Node<'de>],
}

impl<'t, 'de> TapeValue<'t, 'de> {
    /// The value that starts at the first node of `nodes` (a whole tape: its root). simd-json
    /// builds only whole values, so a header never counts more nodes than follow it; `min`
    /// keeps a bad count from panicking all the same.
    pub(super) fn first(nodes: &'t [Node<'de>]) -> Self {
        let len = match nodes.first() {
            Some(Node::Object { count, .. } | Node::Array { count, .. }) => count + 1,
            Some(_) => 1,
            None => 0,
        };
        TapeValue { nodes: &nodes[..len.min(nodes.len())] }
    }

    /// The head node (`null` for an empty tape, which simd-json never returns).
    fn head(&self) -> &'t Node<'de> {
        self.nodes.first().unwrap_or(&Node::Static(StaticNode::Null))
    }

    /// The string, if the value is one.
    pub(super) fn as_str(&self) -> Option<&'de str> {
        match self.head() {
            Node::String(s) => Some(s),
            _ => None,
        }
    }

    /// The nodes after the head: an array's elements or an object's keys and values.
    fn contents(&self) -> &'t [Node<'de>] {
        self.nodes.get(1..).unwrap_or_default()
    }

    /// The elements, if the value is an array.
    pub(super) fn elements(&self) -> Option<Elements<'t, 'de>> {
        match self.head() {
            Node::Array { len, .. } => Some(Elements { rest: self.contents(), left: *len }),
            _ => None,
        }
    }

    /// The value of `key` (of its last occurrence, as a parsed object would hold it), if the
    /// value is an object that has it.
    pub(super) fn get(&self, key: &str) -> Option<TapeValue<'t, 'de>> {
        self.entries()?.filter(|(k, _)| *k == key).last().map(|(_, value)| value)
    }

    /// The entries, in the order written, if the value is an object.
    fn entries(&self) -> Option<Entries<'t, 'de>> {
        match self.head() {
            Node::Object { len, .. } => Some(Entries { rest: self.contents(), left: *len }),
            _ => None,
        }
    }

    /// The value's JSON type, for error messages.
    pub(super) fn json_type(&self) -> &'static str {
        match self.head() {
            Node::Static(StaticNode::Null) => "null",
            Node::Static(StaticNode::Bool(_)) => "a boolean",
            Node::Static(_) => "a number",
            Node::String(_) => "a string",
            Node::Array { .. } => "an array",
            Node::Object { .. } => "an object",
        }
    }
}

/// The entries of an object on the tape, in the order written: a key node, then its value.
#[derive(Clone)]
struct Entries<'t, 'de> {
    /// The nodes from the next key to the end of the object.
    rest: &'t [Node<'de>],
    /// How many entries are left.
    left: usize,
}

impl<'t, 'de> Iterator for Entries<'t, 'de> {
    type Item = (&'de str, TapeValue<'t, 'de>);

    fn next(&mut self) -> Option<Self::Item> {
        let Some(Node::String(key)) = self.rest.first().filter(|_| self.left > 0) else {
            return None;
        };
        self.left -= 1;
        let value = TapeValue::first(&self.rest[1..]);
        self.rest = &self.rest[1 + value.nodes.len()..];
        Some((key, value))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (0, Some(self.left))
    }
}

/// The elements of an array on the tape, in order.
pub(super) struct Elements<'t, 'de> {
    /// The nodes from the next element to the end of the array.
    rest: &'t [Node<'de>],
    /// How many elements are left.
    left: usize,
}

impl<'t, 'de> Iterator for Elements<'t, 'de> {
    type Item = TapeValue<'t, 'de>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 || self.rest.is_empty() {
            return None;
        }
        self.left -= 1;
        let element = TapeValue::first(self.rest);
        self.rest = &self.rest[element.nodes.len()..];
        Some(element)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left, Some(self.left))
    }
}

impl ExactSizeIterator for Elements<'_, '_> {}

/// A serde `Deserializer` over one value of the tape that only lets JSON
/// objects become structs and maps and only arrays become lists, and that
/// refuses arrays with elements left over (see the module documentation).
struct Strict<'t, 'de>(TapeValue<'t, 'de>);

impl Strict<'_, '_> {
    /// The value as serde's `Unexpected`, for type errors.
    fn unexpected(&self) -> Unexpected<'_> {
        match self.0.head() {
            Node::Static(StaticNode::Null) => Unexpected::Other("null"),
            Node::Static(StaticNode::Bool(b)) => Unexpected::Bool(*b),
            Node::Static(StaticNode::I64(i)) => match u64::try_from(*i) {
                Ok(u) => Unexpected::Unsigned(u),
                Err(_) => Unexpected::Signed(*i),
            },
            Node::Static(StaticNode::U64(u)) => Unexpected::Unsigned(*u),
            Node::Static(StaticNode::F64(f)) => Unexpected::Float(*f),
            Node::String(s) => Unexpected::Str(s),
            Node::Array { .. } => Unexpected::Seq,
            Node::Object { .. } => Unexpected::Map,
        }
    }
}

/// Deserializer methods for types that are never null: they name a null
/// as such, then read the value like `deserialize_any`.
macro_rules! deserialize_non_null {
    ($($method:ident)*) => {$(
        fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DecodeError> {
            match self.0.head() {
                Node::Static(StaticNode::Null) => {
                    Err(de::Error::invalid_type(self.unexpected(), &visitor))
                }
                _ => self.deserialize_any(visitor),
            }
        }
    )*};
}

impl<'de> Deserializer<'de> for Strict<'_, 'de> {
    type Error = DecodeError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DecodeError> {
        match *self.0.head() {
            Node::Static(StaticNode::Null) => visitor.visit_unit(),
            Node::Static(StaticNode::Bool(b)) => visitor.visit_bool(b),
            // A parsed `serde_json::Number` read a non-negative integer as a u64 first.
            Node::Static(StaticNode::I64(i)) => match u64::try_from(i) {
                Ok(u) => visitor.visit_u64(u),
                Err(_) => visitor.visit_i64(i),
            },
            Node::Static(StaticNode::U64(u)) => visitor.visit_u64(u),
            Node::Static(StaticNode::F64(f)) => visitor.visit_f64(f),
            Node::String(s) => visitor.visit_borrowed_str(s),
            Node::Array { len, .. } => {
                visit_array(Elements { rest: self.0.contents(), left: len }, visitor)
            }
            // A map's own insert keeps the last value of a key written twice.
            Node::Object { len, .. } => {
                let entries = Entries { rest: self.0.contents(), left: len };
                visitor.visit_map(ObjectReader::new(entries, false))
            }
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DecodeError> {
        match self.0.head() {
            Node::Static(StaticNode::Null) => visitor.visit_none(),
            _ => visitor.visit_some(self),
        }
    }

    /// A struct would refuse a key written twice (serde's "duplicate field"), where
    /// `JSON.parse` keeps the last value: it is handed only the last.
    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DecodeError> {
        match self.0.entries() {
            Some(entries) => visitor.visit_map(ObjectReader::new(entries, true)),
            None => Err(de::Error::invalid_type(self.unexpected(), &visitor)),
        }
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DecodeError> {
        match self.0.head() {
            Node::Object { .. } => self.deserialize_any(visitor),
            _ => Err(de::Error::invalid_type(self.unexpected(), &visitor)),
        }
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DecodeError> {
        match self.0.head() {
            Node::Array { .. } => self.deserialize_any(visitor),
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
        match self.0.head() {
            Node::String(s) => visitor.visit_enum(s.into_deserializer()),
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

    /// A value nobody reads (an unknown field's, a skipped array element) is not walked: it
    /// is whole and valid JSON already, and walking it would sort every object inside it.
    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DecodeError> {
        visitor.visit_unit()
    }

    serde::forward_to_deserialize_any! {
        unit unit_struct identifier
    }
}

/// Hands an array's `elements` to `visitor`, then refuses any it did not take.
fn visit_array<'de, V: Visitor<'de>>(
    elements: Elements<'_, 'de>,
    visitor: V,
) -> Result<V::Value, DecodeError> {
    let len = elements.len();
    let mut reader = ArrayReader { elements: elements.enumerate() };
    let value = visitor.visit_seq(&mut reader)?;
    match reader.elements.len() {
        0 => Ok(value),
        left => Err(de::Error::custom(format!(
            "expected an array of {} elements, got {len}",
            len - left
        ))),
    }
}

/// serde's view of a JSON array, element by element.
struct ArrayReader<'t, 'de> {
    /// The elements not yet read, with their indexes for error paths.
    elements: std::iter::Enumerate<Elements<'t, 'de>>,
}

impl<'de> SeqAccess<'de> for ArrayReader<'_, 'de> {
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

/// serde's view of a JSON object, entry by entry, in the order written.
struct ObjectReader<'t, 'de> {
    /// The entries not yet read.
    entries: Entries<'t, 'de>,
    /// The index of the next entry, for `last_only`.
    index: usize,
    /// Which entries to skip because their key comes again later (for a struct read).
    last_only: LastOnly,
    /// The entry whose key serde has read and whose value it reads next.
    pending: Option<(&'de str, TapeValue<'t, 'de>)>,
}

/// How an [`ObjectReader`] finds the entries whose key comes again later.
enum LastOnly {
    /// It does not: a map read, whose insert keeps the last value anyway.
    No,
    /// Compares each key with the keys after it: no allocation, and quadratic only up to
    /// [`SCAN_ENTRIES`] entries (a struct has a handful).
    Scan,
    /// For larger objects (a hostile struct with thousands of unknown keys): the skipped
    /// entries, by index, found once by sorting the keys.
    Marked(Vec<bool>),
}

/// The most entries an object read as a struct may have for [`LastOnly::Scan`].
const SCAN_ENTRIES: usize = 32;

impl<'t, 'de> ObjectReader<'t, 'de> {
    /// Reads an object's `entries`, handing a repeated key's last value only if `last_only`.
    fn new(entries: Entries<'t, 'de>, last_only: bool) -> Self {
        let last_only = match entries.left {
            _ if !last_only => LastOnly::No,
            0..=SCAN_ENTRIES => LastOnly::Scan,
            len => {
                let mut keys: Vec<(&str, usize)> =
                    entries.clone().enumerate().map(|(i, (key, _))| (key, i)).collect();
                keys.sort_unstable();
                let mut marked = vec![false; len];
                for pair in keys.windows(2) {
                    if pair[0].0 == pair[1].0 {
                        marked[pair[0].1] = true;
                    }
                }
                LastOnly::Marked(marked)
            }
        };
        ObjectReader { entries, index: 0, last_only, pending: None }
    }
}

impl<'de> MapAccess<'de> for ObjectReader<'_, 'de> {
    type Error = DecodeError;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, DecodeError> {
        let (key, value) = loop {
            let Some((key, value)) = self.entries.next() else {
                return Ok(None);
            };
            self.index += 1;
            let later = match &self.last_only {
                LastOnly::No => false,
                LastOnly::Scan => self.entries.clone().any(|(k, _)| k == key),
                LastOnly::Marked(marked) => marked.get(self.index - 1) == Some(&true),
            };
            if !later {
                break (key, value);
            }
        };
        self.pending = Some((key, value));
        seed.deserialize(BorrowedStrDeserializer::new(key)).map(Some)
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
        Some(self.entries.left)
    }
}
