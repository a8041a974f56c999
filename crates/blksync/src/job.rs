//! Jobs: commands that a peer runs on its own host, because every file they touch lives there
//! (docs/PROTOCOL.md, "Jobs"). The peer runs them without knowing what they are. `blksync prune host:/backups/vm` then reads and writes
//! gigabytes on that host and sends a few hundred bytes of progress over the network.
//!
//! A request is a [`Job`] in JSON, and the result is the JSON document that the same command
//! prints with `--json`. JSON because those documents are already a promise to scripts (so the
//! remote and local results cannot drift apart), and because a new job then changes no frame
//! layout. Paths travel as byte arrays: Unix paths need not be UTF-8.

use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::backup::At;
use crate::error::{Error, Result};
use crate::patch::DiffOptions;
use crate::progress::Control;

/// A path as it crosses the wire: its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WirePath(pub PathBuf);

impl WirePath {
    /// Wraps a path.
    #[must_use]
    pub fn new(path: &Path) -> WirePath {
        WirePath(path.to_path_buf())
    }
}

impl Serialize for WirePath {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_bytes(self.0.as_os_str().as_bytes())
    }
}

impl<'de> Deserialize<'de> for WirePath {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<WirePath, D::Error> {
        Ok(WirePath(PathBuf::from(OsString::from_vec(Vec::<u8>::deserialize(d)?))))
    }
}

/// One command with all its files on the peer's host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
#[allow(missing_docs)] // The fields are the command's arguments.
pub enum Job {
    Diff {
        source: WirePath,
        base: WirePath,
        output: WirePath,
        options: DiffOptions,
    },
    Apply {
        deltas: Vec<WirePath>,
        target: WirePath,
        force: bool,
    },
    Merge {
        inputs: Vec<WirePath>,
        output: WirePath,
    },
    Info {
        path: WirePath,
    },
    List {
        dir: WirePath,
        #[serde(default)]
        verify: bool,
    },
    Prune {
        dir: WirePath,
        keep: u64,
        options: DiffOptions,
    },
    Backup {
        source: WirePath,
        dir: WirePath,
        options: DiffOptions,
    },
    Restore {
        dir: WirePath,
        target: WirePath,
        at: At,
        force: bool,
    },
    Sync {
        source: WirePath,
        target: WirePath,
        /// `options.undo`, which travels here (paths are bytes on the wire).
        undo: Option<WirePath>,
        options: crate::sync::SyncOptions,
    },
    Compare {
        first: WirePath,
        second: WirePath,
        options: crate::compare::CompareOptions,
    },
    Clone {
        source: WirePath,
        target: WirePath,
        /// `options.temp_dir`, which travels here (paths are bytes on the wire).
        temp_dir: Option<WirePath>,
        options: crate::clone::CloneOptions,
    },
}

impl Job {
    /// The request's bytes.
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        // Serializing these types cannot fail: no maps with non-string keys, no foreign types.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// A request from its bytes.
    pub fn decode(bytes: &[u8]) -> Result<Job> {
        serde_json::from_slice(bytes).map_err(|e| Error::protocol(format!("bad job request: {e}")))
    }

    /// Gives an output path left empty (the client will fetch the file) a path from `spool`.
    pub fn spool_output(&mut self, spool: impl FnOnce() -> Result<PathBuf>) -> Result<()> {
        if let Job::Diff { output, .. } | Job::Merge { output, .. } = self
            && output.0.as_os_str().is_empty()
        {
            output.0 = spool()?;
        }
        Ok(())
    }

    /// Runs the job here and returns its result document.
    pub fn run(self, control: Control<'_>) -> Result<Vec<u8>> {
        let paths = |v: Vec<WirePath>| v.into_iter().map(|p| p.0).collect::<Vec<_>>();
        match self {
            Job::Diff { source, base, output, options } => {
                json(&crate::patch::diff(&source.0, &base.0, &output.0, &options, control)?)
            }
            Job::Apply { deltas, target, force } => {
                let deltas = paths(deltas);
                let deltas: Vec<&Path> = deltas.iter().map(PathBuf::as_path).collect();
                json(&crate::patch::apply(&deltas, &target.0, force, control)?)
            }
            Job::Merge { inputs, output } => {
                let inputs = paths(inputs);
                let inputs: Vec<&Path> = inputs.iter().map(PathBuf::as_path).collect();
                json(&crate::patch::merge(&inputs, &output.0, control)?)
            }
            Job::Info { path } => json(&crate::patch::info(&path.0)?),
            Job::List { dir, verify } => json(&crate::backup::list(&dir.0, verify)?),
            Job::Prune { dir, keep, options } => json(&crate::backup::prune(&dir.0, keep, &options, control)?),
            Job::Backup { source, dir, options } => json(&crate::backup::backup(&source.0, &dir.0, &options, control)?),
            Job::Restore { dir, target, at, force } => {
                json(&crate::backup::restore(&dir.0, &target.0, at, force, control)?)
            }
            Job::Sync { source, target, undo, options } => {
                crate::sync::check_block_size(options.block_size as u64)?;
                let options = crate::sync::SyncOptions { undo: undo.map(|u| u.0), ..options };
                json(&crate::sync::sync_paths(&source.0, &target.0, &options, control)?)
            }
            Job::Compare { first, second, options } => {
                crate::sync::check_block_size(options.block_size as u64)?;
                json(&crate::compare::compare_paths(&first.0, &second.0, &options, control)?)
            }
            Job::Clone { source, target, temp_dir, options } => {
                crate::sync::check_block_size(options.block_size as u64)?;
                let options = crate::clone::CloneOptions { temp_dir: temp_dir.map(|t| t.0), ..options };
                json(&crate::clone::clone_paths(&source.0, &target.0, &options, control)?)
            }
        }
    }
}

fn json(value: &impl Serialize) -> Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(|e| Error::protocol(format!("encoding a job result: {e}")))
}

/// A job's result document as `T`.
pub fn result<T: DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| Error::protocol(format!("bad job result: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn options() -> DiffOptions {
        DiffOptions {
            block_size: 4096,
            threads: 2,
            keep_cache: false,
            comment: "c".into(),
            bwlimit: Some(5),
            force: false,
            compress: Some(3),
            fs_aware: true,
        }
    }

    #[test]
    fn jobs_round_trip_with_paths_that_are_not_utf8() {
        let odd = WirePath(PathBuf::from(OsString::from_vec(vec![b'/', 0xFF, b'x', b' ', b'\n'])));
        let jobs = [
            Job::Diff { source: odd.clone(), base: odd.clone(), output: odd.clone(), options: options() },
            Job::Apply { deltas: vec![odd.clone(), odd.clone()], target: odd.clone(), force: true },
            Job::Merge { inputs: vec![odd.clone()], output: odd.clone() },
            Job::Info { path: odd.clone() },
            Job::List { dir: odd.clone(), verify: true },
            Job::Prune { dir: odd.clone(), keep: 3, options: options() },
            Job::Backup { source: odd.clone(), dir: odd.clone(), options: options() },
            Job::Restore { dir: odd.clone(), target: odd.clone(), at: At::Time(-5), force: false },
            Job::Sync {
                source: odd.clone(),
                target: odd.clone(),
                undo: Some(odd.clone()),
                options: crate::sync::SyncOptions { undo: None, ..crate::sync::SyncOptions::default() },
            },
            Job::Clone {
                source: odd.clone(),
                target: odd.clone(),
                temp_dir: Some(odd.clone()),
                options: crate::clone::CloneOptions { grow: Some(2), block_size: 4096, ..Default::default() },
            },
            Job::Compare {
                first: odd.clone(),
                second: odd,
                options: crate::compare::CompareOptions {
                    block_size: 512,
                    keep_cache: true,
                    threads: 0,
                    max_ranges: 9,
                    fs_aware: true,
                },
            },
        ];
        for job in jobs {
            assert_eq!(Job::decode(&job.encode()).unwrap(), job);
        }
    }

    proptest! {
        /// Hostile requests are errors, not panics.
        #[test]
        fn random_requests_are_errors_not_panics(data in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Job::decode(&data);
            let _ = result::<crate::patch::Info>(&data);
        }
    }
}
