//! Typed, located access to the parsed TOML tree: every value keeps its dotted
//! key and byte span, so any check can point at it.

use crate::locate::Ctx;
use crate::SpecError;
use std::ops::Range;
use toml::de::{DeTable, DeValue};
use toml::Spanned;

/// A TOML table with its dotted key ("" for the document) and span.
pub(crate) struct Table<'a> {
    pub(crate) key: String,
    pub(crate) span: Range<usize>,
    map: &'a DeTable<'a>,
}

/// One value with its dotted key and the span of the key naming it.
#[derive(Clone)]
pub(crate) struct Field<'a> {
    pub(crate) key: String,
    pub(crate) key_span: Range<usize>,
    pub(crate) value: &'a Spanned<DeValue<'a>>,
}

/// `parent.name`, or `name` at the top.
pub(crate) fn join(parent: &str, name: &str) -> String {
    if parent.is_empty() {
        name.to_string()
    } else {
        format!("{parent}.{name}")
    }
}

impl<'a> Table<'a> {
    /// The document's root table.
    pub(crate) fn root(map: &'a Spanned<DeTable<'a>>) -> Self {
        Table {
            key: String::new(),
            span: map.span(),
            map: map.get_ref(),
        }
    }

    /// The same table, named `key` in errors (a stage by its name, once known).
    pub(crate) fn renamed(&self, key: String) -> Table<'a> {
        Table {
            key,
            span: self.span.clone(),
            map: self.map,
        }
    }

    /// Fails on the first key (in file order) not in `allowed`.
    pub(crate) fn check_keys(&self, cx: &Ctx<'_>, allowed: &[&str]) -> Result<(), SpecError> {
        let unknown = self
            .map
            .iter()
            .filter(|(k, _)| !allowed.contains(&k.get_ref().as_ref()))
            .min_by_key(|(k, _)| k.span().start);
        match unknown {
            Some((k, _)) => Err(cx.err(
                k.span(),
                &join(&self.key, k.get_ref()),
                format!(
                    "unknown key \"{}\" (expected one of: {})",
                    k.get_ref(),
                    allowed.join(", ")
                ),
            )),
            None => Ok(()),
        }
    }

    /// The entries present among `names`, in file order.
    pub(crate) fn present(&self, names: &[&str]) -> Vec<Field<'a>> {
        let mut found: Vec<Field<'a>> = names.iter().filter_map(|n| self.get(n)).collect();
        found.sort_by_key(|f| f.key_span.start);
        found
    }

    /// Every entry, in file order.
    pub(crate) fn fields(&self) -> Vec<Field<'a>> {
        let mut all: Vec<Field<'a>> = self
            .map
            .iter()
            .map(|(k, value)| Field {
                key: join(&self.key, k.get_ref()),
                key_span: k.span(),
                value,
            })
            .collect();
        all.sort_by_key(|f| f.key_span.start);
        all
    }

    /// The value under `name`, if present.
    pub(crate) fn get(&self, name: &str) -> Option<Field<'a>> {
        let (k, value) = self
            .map
            .iter()
            .find(|(k, _)| k.get_ref().as_ref() == name)?;
        Some(Field {
            key: join(&self.key, name),
            key_span: k.span(),
            value,
        })
    }

    /// The dotted key of the entry whose key or value holds byte `offset`.
    pub(crate) fn key_at(&self, offset: usize) -> Option<String> {
        let holds =
            |span: Range<usize>| span.start <= offset && offset < span.end.max(span.start + 1);
        let (k, _) = self
            .map
            .iter()
            .find(|(k, v)| holds(k.span()) || holds(v.span()))?;
        Some(join(&self.key, k.get_ref()))
    }

    /// The value under `name`, or an error at this table saying it is missing.
    pub(crate) fn require(&self, cx: &Ctx<'_>, name: &str) -> Result<Field<'a>, SpecError> {
        self.get(name).ok_or_else(|| {
            cx.err(
                self.span.clone(),
                &join(&self.key, name),
                format!("missing key \"{name}\""),
            )
        })
    }
}

impl<'a> Field<'a> {
    /// The value's span.
    pub(crate) fn span(&self) -> Range<usize> {
        self.value.span()
    }

    /// An error at the value, under this field's key.
    pub(crate) fn err(&self, cx: &Ctx<'_>, message: impl Into<String>) -> SpecError {
        cx.err(self.span(), &self.key, message)
    }

    /// A type mismatch: "expected X, found Y".
    pub(crate) fn wrong_type(&self, cx: &Ctx<'_>, expected: &str) -> SpecError {
        let found = self.value.get_ref().type_str();
        self.err(cx, format!("expected {expected}, found {found}"))
    }

    /// The value as a string.
    pub(crate) fn str(&self, cx: &Ctx<'_>) -> Result<&'a str, SpecError> {
        self.value
            .get_ref()
            .as_str()
            .ok_or_else(|| self.wrong_type(cx, "a string"))
    }

    /// The value as a string that is not blank.
    pub(crate) fn non_empty_str(&self, cx: &Ctx<'_>) -> Result<&'a str, SpecError> {
        let s = self.str(cx)?;
        if s.trim().is_empty() {
            return Err(self.err(cx, "must not be empty"));
        }
        Ok(s)
    }

    /// The value as a name: 1 to 128 bytes of printable text (see `check_name`).
    pub(crate) fn name(&self, cx: &Ctx<'_>) -> Result<&'a str, SpecError> {
        let s = self.str(cx)?;
        crate::check_name(s).map_err(|why| self.err(cx, format!("name {why}")))?;
        Ok(s)
    }

    /// The value as a boolean.
    pub(crate) fn bool(&self, cx: &Ctx<'_>) -> Result<bool, SpecError> {
        self.value
            .get_ref()
            .as_bool()
            .ok_or_else(|| self.wrong_type(cx, "a boolean"))
    }

    /// The value as an integer, if it is one that fits an i64.
    pub(crate) fn as_int(&self) -> Option<i64> {
        let int = self.value.get_ref().as_integer()?;
        i64::from_str_radix(int.as_str(), int.radix()).ok()
    }

    /// The value as an integer (i64).
    pub(crate) fn int(&self, cx: &Ctx<'_>) -> Result<i64, SpecError> {
        match self.value.get_ref() {
            DeValue::Integer(_) => self
                .as_int()
                .ok_or_else(|| self.err(cx, "integer out of range")),
            _ => Err(self.wrong_type(cx, "an integer")),
        }
    }

    /// The value as an array; elements keep this field's key.
    pub(crate) fn array(&self, cx: &Ctx<'_>) -> Result<Vec<Field<'a>>, SpecError> {
        let array = self
            .value
            .get_ref()
            .as_array()
            .ok_or_else(|| self.wrong_type(cx, "an array"))?;
        Ok(array
            .iter()
            .map(|value| Field {
                value,
                ..self.clone()
            })
            .collect())
    }

    /// The value as an array of strings.
    pub(crate) fn strings(&self, cx: &Ctx<'_>) -> Result<Vec<(String, Range<usize>)>, SpecError> {
        let strings = self.array(cx)?.into_iter().map(|f| {
            f.value
                .get_ref()
                .as_str()
                .map(|s| (s.to_string(), f.span()))
                .ok_or_else(|| {
                    f.err(
                        cx,
                        format!("expected strings, found {}", f.value.get_ref().type_str()),
                    )
                })
        });
        strings.collect()
    }

    /// The value as a table.
    pub(crate) fn table(&self, cx: &Ctx<'_>) -> Result<Table<'a>, SpecError> {
        let map = self
            .value
            .get_ref()
            .as_table()
            .ok_or_else(|| self.wrong_type(cx, "a table"))?;
        Ok(Table {
            key: self.key.clone(),
            span: self.span(),
            map,
        })
    }
}
