//! The `--json` documents, specified in docs/JSON.md: every run of a command with `--json` prints
//! exactly one object on stdout, whether it succeeds, fails or is interrupted.
//!
//! The envelope (`command`, `schema`, `exit_code`, and `error` on failure) is added here, once,
//! around the library's summary. A remote or on-host run returns the same library summary (jobs
//! send the document the local command builds, see `blksync::job`), so every mode of a command
//! prints the same fields. Where the library's summaries of one command differ between modes
//! (`backup`), [`fill`] adds the missing fields, as `null` when the value is not known.

use anyhow::{Context, Result};
use serde::Serialize;
use serde_json::{Map, Value};

use crate::console;

/// The schema version, `schema` in every document. It changes only when a field is removed or
/// changes its type or meaning; new fields keep it (docs/JSON.md, "Versioning").
pub const SCHEMA: u32 = 1;

/// The fields of a document after the envelope.
pub type Body = Map<String, Value>;

/// The envelope, first in every document; the body's fields follow.
#[derive(Serialize)]
struct Envelope<'a> {
    command: Option<&'a str>,
    schema: u32,
    exit_code: u8,
    #[serde(flatten)]
    body: Body,
}

/// A library summary as a document body.
pub fn body(summary: &impl Serialize) -> Result<Body> {
    match serde_json::to_value(summary)? {
        Value::Object(map) => Ok(map),
        other => anyhow::bail!("a --json summary must be an object, not {other}"),
    }
}

/// A body holding one field, `name` (`list`'s `points`).
pub fn field(name: &str, value: &impl Serialize) -> Result<Body> {
    let mut map = Map::new();
    map.insert(name.to_string(), serde_json::to_value(value)?);
    Ok(map)
}

/// Adds each `(name, value)` that `body` lacks, so that every mode of a command has the same
/// fields.
pub fn fill(body: &mut Body, fields: impl IntoIterator<Item = (&'static str, Value)>) {
    for (name, value) in fields {
        body.entry(name).or_insert(value);
    }
}

fn render(command: &str, exit_code: u8, body: Body) -> Result<String> {
    Ok(serde_json::to_string(&Envelope { command: Some(command), schema: SCHEMA, exit_code, body })?)
}

/// Prints the document of `command`, which has completed with `exit_code` (0, or 1 for
/// `compare` finding differences).
pub fn print(command: &str, exit_code: u8, body: Body) -> Result<()> {
    Ok(console::out(&render(command, exit_code, body)?)?)
}

/// [`print()`] for a command whose result is its work, not the document: if stdout fails, the
/// error says that only the summary was lost.
pub fn print_summary(command: &str, body: Body) -> Result<()> {
    print(command, 0, body)
        .with_context(|| format!("the {command} completed, but its JSON summary could not be printed"))
}

/// The document of a failed or interrupted run: `error` with its `kind` and the whole `message`
/// chain, and `done`, the last progress the run reported (`null` when it reported none).
pub fn failure(error: &anyhow::Error, done: Option<(&str, blksync::progress::Snapshot)>) -> Body {
    let mut body = Map::new();
    let error = serde_json::json!({ "kind": kind(error), "message": format!("{error:#}") });
    body.insert("error".into(), error);
    let done = done.and_then(|(phase, snapshot)| {
        let mut map = self::body(&snapshot).ok()?;
        map.insert("phase".into(), phase.into());
        Some(Value::Object(map))
    });
    body.insert("done".into(), done.unwrap_or(Value::Null));
    body
}

/// Prints a failure document. Failing to print it changes nothing: the run has failed already,
/// and the error is on stderr.
pub fn print_failure(command: &str, exit_code: u8, body: Body) {
    if let Ok(text) = render(command, exit_code, body) {
        let _ = console::out(&text);
    }
}

/// Prints the document of a command line that clap rejected (exit 2): `command` is the
/// subcommand when one was recognized, else `null`, and `done` is `null`.
pub fn print_usage_failure(command: Option<&str>, message: &str) {
    let mut body = Map::new();
    body.insert("error".into(), serde_json::json!({ "kind": "usage", "message": message }));
    body.insert("done".into(), Value::Null);
    let envelope = Envelope { command, schema: SCHEMA, exit_code: 2, body };
    if let Ok(text) = serde_json::to_string(&envelope) {
        let _ = console::out(&text);
    }
}

/// The `kind` of an error, in snake case. Errors that are not the library's are the CLI's own
/// argument checks: `usage`.
pub fn kind(error: &anyhow::Error) -> &'static str {
    use blksync::ErrorKind as K;
    match error.downcast_ref::<blksync::Error>().map(blksync::Error::kind) {
        None | Some(K::Usage) => "usage",
        Some(K::NotFound) => "not_found",
        Some(K::PermissionDenied) => "permission_denied",
        Some(K::Io) => "io",
        Some(K::NoSpace) => "no_space",
        Some(K::SizeMismatch) => "size_mismatch",
        Some(K::InUse) => "in_use",
        Some(K::VerifyFailed) => "verify_failed",
        Some(K::Interrupted) => "interrupted",
        Some(K::Connection) => "connection",
        Some(K::Protocol) => "protocol",
        Some(K::Corrupt) => "corrupt",
        Some(K::WrongTarget) => "wrong_target",
        Some(K::Unsupported) => "unsupported",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_comes_first_and_keeps_the_summary_fields() {
        let mut body = body(&serde_json::json!({ "bytes_written": 5, "source": "a" })).unwrap();
        fill(&mut body, [("undo_log", Value::Null), ("source", "ignored".into())]);
        let text = render("sync", 0, body).unwrap();
        assert!(text.starts_with(r#"{"command":"sync","schema":1,"exit_code":0,"#), "{text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["bytes_written"], 5);
        assert_eq!(v["source"], "a", "fill never replaces a field");
        assert_eq!(v["undo_log"], Value::Null);
    }

    #[test]
    fn library_error_kinds_keep_their_name_through_context() {
        let kinds = [
            blksync::ErrorKind::NotFound,
            blksync::ErrorKind::Io,
            blksync::ErrorKind::Interrupted,
            blksync::ErrorKind::WrongTarget,
        ];
        for k in kinds {
            let e = anyhow::Error::from(blksync::Error::new(k, "x")).context("outer");
            assert_ne!(kind(&e), "usage", "{k:?} seen through context");
        }
        assert_eq!(kind(&anyhow::anyhow!("apply needs PATCH... TARGET")), "usage");
    }
}
