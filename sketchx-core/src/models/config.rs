//! The one way sketchx reads the JSON and text files that describe a model: diffusers' `config.json` and
//! `scheduler_config.json`, transformers' text encoder config and the tokenizer files.
//!
//! Every reader maps errors the same way: a file that does not exist is [`Error::MissingFile`] naming it, a file that
//! cannot be read is [`Error::Io`], and a file that is not what it should be is [`Error::MalformedFile`] naming the
//! file and, for a bad value, the key. A [`ConfigFile`] treats a `null` value and a key listed in diffusers'
//! `_use_default_values` as absent, as diffusers' `from_config` does, so the caller's default applies.

use std::path::Path;

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// Reads a text file (UTF-8), with the crate's error mapping.
pub fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| Error::reading(path, e))
}

/// Reads and deserializes a JSON file, with errors naming the file.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = read_text(path)?;
    serde_json::from_str(&text).map_err(|e| Error::malformed(path.display(), e))
}

/// A configuration file: one JSON object, with typed getters whose errors name the file and the key.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigFile {
    map: Map<String, Value>,
    origin: String,
}

impl ConfigFile {
    /// Reads and parses the file at `path` (named by its path in errors).
    pub fn read(path: &Path) -> Result<Self> {
        Self::read_as(path, &path.display().to_string())
    }

    /// Reads the file at `path`, naming it `origin` in errors (e.g. `owner/repo/unet/config.json` for a file that
    /// came from the Hub).
    pub fn read_as(path: &Path, origin: &str) -> Result<Self> {
        Self::parse(&read_text(path)?, origin)
    }

    /// Parses JSON text; `origin` names it in errors.
    pub fn parse(json: &str, origin: &str) -> Result<Self> {
        let value: Value = serde_json::from_str(json).map_err(|e| Error::malformed(origin, e))?;
        Self::from_value(value, origin)
    }

    /// Wraps an already parsed JSON value, which must be an object; `origin` names it in errors.
    pub fn from_value(value: Value, origin: &str) -> Result<Self> {
        let Value::Object(mut map) = value else {
            return Err(Error::malformed(origin, "expected a JSON object"));
        };
        if let Some(Value::Array(defaults)) = map.remove("_use_default_values") {
            for key in defaults.iter().filter_map(Value::as_str) {
                map.remove(key);
            }
        }
        map.retain(|_, v| !v.is_null());
        Ok(Self {
            map,
            origin: origin.to_string(),
        })
    }

    /// The name used in errors.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The value of `key`, if present and not `null`.
    pub fn present(&self, key: &str) -> Option<&Value> {
        self.map.get(key)
    }

    /// The keys present (not `null`, not in `_use_default_values`).
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.map.keys().map(String::as_str)
    }

    /// The whole object deserialized into `T` (serde's message names the offending field).
    pub fn deserialize<T: DeserializeOwned>(&self) -> Result<T> {
        serde_json::from_value(Value::Object(self.map.clone()))
            .map_err(|e| Error::malformed(&self.origin, e))
    }

    /// The error for a value of `key` that is not `want`.
    pub fn bad(&self, key: &str, want: &str) -> Error {
        Error::malformed(&self.origin, format!("`{key}` must be {want}"))
    }

    fn get<T>(
        &self,
        key: &str,
        want: &str,
        f: impl FnOnce(&Value) -> Option<T>,
    ) -> Result<Option<T>> {
        self.present(key)
            .map(|v| f(v).ok_or_else(|| self.bad(key, want)))
            .transpose()
    }

    /// A non-negative integer, if present.
    pub fn usize_opt(&self, key: &str) -> Result<Option<usize>> {
        self.get(key, "a non-negative integer", as_usize)
    }

    /// A non-negative integer, or `default` when absent.
    pub fn usize_or(&self, key: &str, default: usize) -> Result<usize> {
        Ok(self.usize_opt(key)?.unwrap_or(default))
    }

    /// A required non-negative integer.
    pub fn usize(&self, key: &str) -> Result<usize> {
        self.usize_opt(key)?.ok_or_else(|| self.bad(key, "present"))
    }

    /// An integer (a number with no fractional part, as Python writes `3.0`), if present.
    pub fn i64_opt(&self, key: &str) -> Result<Option<i64>> {
        self.get(key, "an integer", |v| {
            // `as` would saturate a float past the i64 range into a plausible-looking integer.
            const BOUND: f64 = 9_223_372_036_854_775_808.0; // 2^63
            v.as_i64().or_else(|| {
                v.as_f64()
                    .filter(|f| f.fract() == 0.0 && (-BOUND..BOUND).contains(f))
                    .map(|f| f as i64)
            })
        })
    }

    /// A number, if present.
    pub fn f64_opt(&self, key: &str) -> Result<Option<f64>> {
        self.get(key, "a number", Value::as_f64)
    }

    /// A number, or `default` when absent.
    pub fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        Ok(self.f64_opt(key)?.unwrap_or(default))
    }

    /// A boolean, if present.
    pub fn bool_opt(&self, key: &str) -> Result<Option<bool>> {
        self.get(key, "true or false", Value::as_bool)
    }

    /// A boolean, or `default` when absent.
    pub fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        Ok(self.bool_opt(key)?.unwrap_or(default))
    }

    /// A string, if present.
    pub fn str_opt(&self, key: &str) -> Result<Option<&str>> {
        self.present(key)
            .map(|v| v.as_str().ok_or_else(|| self.bad(key, "a string")))
            .transpose()
    }

    /// A string, or `default` when absent.
    pub fn string_or(&self, key: &str, default: &str) -> Result<String> {
        Ok(self.str_opt(key)?.unwrap_or(default).to_string())
    }

    /// A list of non-negative integers (required).
    pub fn usize_list(&self, key: &str) -> Result<Vec<usize>> {
        self.list(key, "a list of non-negative integers", as_usize)?
            .ok_or_else(|| self.bad(key, "a list of non-negative integers"))
    }

    /// A list of strings (required).
    pub fn str_list(&self, key: &str) -> Result<Vec<String>> {
        self.list(key, "a list of strings", |v| v.as_str().map(str::to_string))?
            .ok_or_else(|| self.bad(key, "a list of strings"))
    }

    /// A list of numbers, if present.
    pub fn f64_list_opt(&self, key: &str) -> Result<Option<Vec<f64>>> {
        self.list(key, "a list of numbers", Value::as_f64)
    }

    fn list<T>(
        &self,
        key: &str,
        want: &str,
        item: impl Fn(&Value) -> Option<T>,
    ) -> Result<Option<Vec<T>>> {
        self.get(key, want, |v| {
            v.as_array()?.iter().map(&item).collect::<Option<Vec<T>>>()
        })
    }

    /// An integer applied to every one of `n` blocks, or a per-block list of length `n`; `default` for every block
    /// when absent (required when `None`).
    pub fn per_block(&self, key: &str, n: usize, default: Option<usize>) -> Result<Vec<usize>> {
        match self.present(key) {
            None => match default {
                Some(d) => Ok(vec![d; n]),
                None => Err(self.bad(key, "present")),
            },
            Some(Value::Array(_)) => {
                let v = self.usize_list(key)?;
                if v.len() != n {
                    return Err(self.bad(key, &format!("a list of {n} entries (one per block)")));
                }
                Ok(v)
            }
            Some(_) => Ok(vec![self.usize(key)?; n]),
        }
    }

    /// Refuses ([`Error::UnsupportedModel`]) a key whose value is none of `allowed`, the only values sketchx
    /// implements; an absent key is accepted.
    pub fn require(&self, key: &str, allowed: &[Value]) -> Result<()> {
        match self.present(key) {
            None => Ok(()),
            Some(v) if allowed.contains(v) => Ok(()),
            Some(v) => Err(Error::unsupported(&self.origin, format!("`{key}` = {v}"))),
        }
    }
}

fn as_usize(v: &Value) -> Option<usize> {
    v.as_u64().and_then(|x| usize::try_from(x).ok())
}

/// Gives a model that has `load(Weights, &ConfigFile)` the constructor from a `VarBuilder` (whose dtype and device
/// give the precision, see [`Weights::of_builder`](crate::precision::Weights::of_builder)) and a parsed config named `origin` in errors.
macro_rules! var_builder_constructor {
    ($model:ty, $what:literal) => {
        impl $model {
            #[doc = concat!("Builds ", $what, " from its parsed `config.json` and a `VarBuilder`, whose dtype and")]
            #[doc = "device give the precision; `origin` names the file in errors. `load` does the same from"]
            #[doc = "[`Weights`](crate::precision::Weights) and a [`ConfigFile`](crate::models::config::ConfigFile)."]
            pub fn new(
                vb: candle_nn::VarBuilder,
                value: &serde_json::Value,
                origin: &str,
            ) -> crate::error::Result<Self> {
                Self::load(
                    crate::precision::Weights::of_builder(vb),
                    &crate::models::config::ConfigFile::from_value(value.clone(), origin)?,
                )
            }
        }
    };
}
pub(crate) use var_builder_constructor;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn null_and_use_default_values_count_as_absent() {
        let c = ConfigFile::parse(
            r#"{"a": null, "b": 3, "c": 2.0, "_use_default_values": ["b"]}"#,
            "x.json",
        )
        .unwrap();
        assert_eq!(c.usize_or("a", 7).unwrap(), 7);
        assert_eq!(c.usize_or("b", 7).unwrap(), 7);
        assert_eq!(c.i64_opt("c").unwrap(), Some(2));
    }

    #[test]
    fn errors_name_file_and_key() {
        let c = ConfigFile::parse(r#"{"n": "x", "l": [1, -1]}"#, "dir/config.json").unwrap();
        for err in [
            c.usize_or("n", 0).unwrap_err(),
            c.usize_list("l").unwrap_err(),
            c.usize("missing").unwrap_err(),
        ] {
            let Error::MalformedFile { path, message } = err else {
                panic!("not MalformedFile")
            };
            assert_eq!(path, "dir/config.json");
            assert!(message.starts_with('`'), "{message}");
        }
        assert!(matches!(
            ConfigFile::parse("[1]", "a.json"),
            Err(Error::MalformedFile { .. })
        ));
        assert!(matches!(
            ConfigFile::read(Path::new("/no/such/config.json")),
            Err(Error::MissingFile { ref path }) if path == "/no/such/config.json"
        ));
    }

    #[test]
    fn per_block_takes_a_scalar_or_a_list_of_n() {
        let c = ConfigFile::parse(r#"{"s": 4, "l": [1, 2], "bad": [1]}"#, "c").unwrap();
        assert_eq!(c.per_block("s", 3, None).unwrap(), vec![4, 4, 4]);
        assert_eq!(c.per_block("l", 2, None).unwrap(), vec![1, 2]);
        assert!(c.per_block("bad", 2, None).is_err());
        assert_eq!(c.per_block("absent", 2, Some(8)).unwrap(), vec![8, 8]);
    }
}
