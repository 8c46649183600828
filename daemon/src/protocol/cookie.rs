//! Cookies and row keys: the two names a group's data goes by on the wire. A cookie names a
//! version (zero-cache's LexiVersion, so that string order is version order, which the
//! client relies on); a row key names a row by its primary key, the same whichever order
//! the client wrote the key's columns in.

use serde_json::Value;

use crate::protocol::poke::Row;

/// Digits of base 36, the alphabet of cookies.
const BASE36: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";

/// The cookie of a version: zero-cache's LexiVersion (see the module doc).
pub fn version_to_cookie(version: u64) -> String {
    // u64::MAX has 13 base-36 digits.
    let mut digits = [0u8; 13];
    let mut start = digits.len();
    let mut rest = version;
    loop {
        start -= 1;
        digits[start] = BASE36[(rest % 36) as usize];
        rest /= 36;
        if rest == 0 {
            break;
        }
    }
    let len = digits.len() - start;
    let mut cookie = String::with_capacity(len + 1);
    cookie.push(BASE36[len - 1] as char);
    cookie.extend(digits[start..].iter().map(|&d| d as char));
    cookie
}

/// The version of a cookie, if it is one [`version_to_cookie`] writes.
///
/// Only the exact form is accepted (no leading zeros, lowercase), so one
/// version has one cookie. zero-cache's cookies with a `:` or `.` suffix are
/// not ours and are refused.
pub fn cookie_to_version(cookie: &str) -> Option<u64> {
    let (&len_digit, digits) = cookie.as_bytes().split_first()?;
    let len = base36_value(len_digit)? as usize + 1;
    if digits.len() != len || (len > 1 && digits[0] == b'0') {
        return None;
    }
    digits.iter().try_fold(0u64, |version, &digit| {
        version.checked_mul(36)?.checked_add(u64::from(base36_value(digit)?))
    })
}

/// The value of one lowercase base-36 digit.
pub fn base36_value(digit: u8) -> Option<u8> {
    match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'z' => Some(digit - b'a' + 10),
        _ => None,
    }
}

/// The key of a row within its table: the JSON array of `[column, value]`
/// pairs of the primary key, in primary-key order. It keeps the column names
/// so that a deletion can name the row's `id` without the row.
pub fn row_key(primary_key: &[String], value: &Row) -> Result<String, String> {
    let mut pairs = Vec::with_capacity(primary_key.len());
    for column in primary_key {
        match value.get(column) {
            Some(v @ (Value::String(_) | Value::Number(_) | Value::Bool(_))) => {
                pairs.push((column.as_str(), normalize_key_value(v)));
            }
            Some(other) => {
                return Err(format!(
                    "primary key column {column:?} must be a string, number or boolean, not {other}"
                ));
            }
            None => return Err(format!("primary key column {column:?} is missing")),
        }
    }
    serde_json::to_string(&pairs).map_err(|e| e.to_string())
}

/// Writes integral numbers as integers, so that `1` and `1.0` (the same
/// number to the JavaScript client) make the same key.
pub fn normalize_key_value(value: &Value) -> Value {
    /// Integers up to 2^53 are exact in both f64 and the client's numbers.
    const MAX_EXACT: f64 = 9_007_199_254_740_992.0;
    match value.as_f64() {
        Some(f) if value.is_f64() && f.fract() == 0.0 && f.abs() <= MAX_EXACT => {
            Value::from(f as i64)
        }
        _ => value.clone(),
    }
}

/// The `[column, value]` pairs of a row key.
pub fn key_columns(key: &str) -> Result<Vec<(String, Value)>, serde_json::Error> {
    serde_json::from_str(key)
}
