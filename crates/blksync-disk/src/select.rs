//! Choosing one partition of a table: by number (`2`), by GPT name (`name=root`) or by
//! PARTUUID (`partuuid=…`, either case).

use blksync_core::{Error, Result};

use crate::{Partition, Table};

/// Which partition a command means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    /// Its number (`sda2`: 2).
    Number(u32),
    /// Its GPT name (`PARTLABEL`), exactly.
    Name(String),
    /// Its PARTUUID, compared without regard to case.
    PartUuid(String),
}

impl Selector {
    /// Parses `"2"`, `"name=root"` or `"partuuid=…"`.
    pub fn parse(s: &str) -> Result<Selector> {
        if let Some(name) = s.strip_prefix("name=") {
            if name.is_empty() {
                return Err(Error::usage("partition selector \"name=\" needs a name"));
            }
            return Ok(Selector::Name(name.to_owned()));
        }
        if let Some(uuid) = s.strip_prefix("partuuid=") {
            if uuid.is_empty() {
                return Err(Error::usage("partition selector \"partuuid=\" needs a PARTUUID"));
            }
            return Ok(Selector::PartUuid(uuid.to_owned()));
        }
        match s.parse::<u32>() {
            Ok(n) if n > 0 => Ok(Selector::Number(n)),
            _ => Err(Error::usage(format!(
                "partition selector {s:?} is not a number from 1, name=NAME or partuuid=PARTUUID"
            ))),
        }
    }
}

impl std::fmt::Display for Selector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Selector::Number(n) => write!(f, "{n}"),
            Selector::Name(name) => write!(f, "name={name}"),
            Selector::PartUuid(uuid) => write!(f, "partuuid={uuid}"),
        }
    }
}

pub(crate) fn find<'t>(table: &'t Table, sel: &Selector) -> Result<&'t Partition> {
    let matches: Vec<&Partition> = table
        .partitions
        .iter()
        .filter(|p| match sel {
            Selector::Number(n) => p.number == *n,
            Selector::Name(name) => p.name.as_deref() == Some(name.as_str()),
            Selector::PartUuid(uuid) => p.partuuid.eq_ignore_ascii_case(uuid),
        })
        .collect();
    if let [one] = matches[..] {
        Ok(one)
    } else {
        {
            let what = if matches.is_empty() { "no partition" } else { "more than one partition" };
            let list: Vec<String> = table
                .partitions
                .iter()
                .map(|p| match &p.name {
                    Some(name) => format!("{} (name={name}, partuuid={})", p.number, p.partuuid),
                    None => format!("{} (partuuid={})", p.number, p.partuuid),
                })
                .collect();
            let list = if list.is_empty() { "none".to_owned() } else { list.join(", ") };
            Err(Error::usage(format!(
                "{}: {what} matches {sel} in its {} table; its partitions: {list}",
                table.name().display(),
                table.label()
            )))
        }
    }
}
