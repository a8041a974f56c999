//! `lvm://VG/LV` and `lvm+snapshot://VG/LV` (from bsync).
//!
//! `lvm://VG/LV` is the logical volume's device, as a source or a target. As a target, a missing
//! LV is created with the source's size: linear, or thin in a pool (`?thin-pool=POOL`, which
//! `--thin-pool` adds). Too little free space in the VG is an error before anything is created.
//!
//! `lvm+snapshot://VG/LV` is a source only, the way to back up a live volume:
//! 1. a snapshot is created under a name that marks it as ours, `LV-blksync-snap-PID`: a thin
//!    snapshot of a thin LV, or a classic copy-on-write snapshot of `?snapshot-size=SIZE`
//!    (`--snapshot-size`; by default a tenth of the origin, at least 1 GiB, and no more than the
//!    VG has free);
//! 2. the snapshot is read;
//! 3. before success is reported ([`crate::endpoint::Source::check_intact`]), it is checked
//!    still valid: a classic snapshot whose copy-on-write area filled up while it was read has
//!    been invalidated, and what was read from it is garbage;
//! 4. it is removed on every exit path, after its device is closed (`lvremove` refuses an open
//!    LV).
//!
//! A snapshot whose PID is no longer running on this host (a run killed with SIGKILL) is removed
//! by the next run on that origin; a snapshot we did not create is never touched. lvm runs with
//! `LVM_SUPPRESS_FD_WARNINGS=1`, and its reports are read as JSON (`--reportformat json`).

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;

use crate::error::{Error, ErrorKind, Result};

/// `VG/LV`, with the options an address may carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Volume {
    /// Volume group.
    pub vg: String,
    /// Logical volume.
    pub lv: String,
    /// `thin-pool=POOL`: create a missing target LV thin, in this pool.
    pub thin_pool: Option<String>,
    /// `snapshot-size=SIZE`: the copy-on-write area of a classic snapshot.
    pub snapshot_size: Option<u64>,
}

impl Volume {
    /// Parses `VG/LV[?key=value&…]` (what follows `lvm://` or `lvm+snapshot://`).
    pub fn parse(text: &str, address: &Path) -> Result<Volume> {
        let bad =
            |why: &str| Error::usage(format!("{}: {why} (expected VG/LV, e.g. lvm://vg0/vm1)", address.display()));
        let (path, query) = text.split_once('?').unwrap_or((text, ""));
        let (vg, lv) = path.split_once('/').ok_or_else(|| bad("no volume group"))?;
        let name_ok = |n: &str| {
            !n.is_empty()
                && n != "."
                && n != ".."
                && !n.starts_with('-')
                && n.chars().all(|c| c.is_ascii_alphanumeric() || "+_.-".contains(c))
        };
        if !name_ok(vg) || !name_ok(lv) {
            return Err(bad("invalid volume group or logical volume name"));
        }
        let mut volume = Volume { vg: vg.into(), lv: lv.into(), thin_pool: None, snapshot_size: None };
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("thin-pool", pool)) if name_ok(pool) => volume.thin_pool = Some(pool.into()),
                Some(("snapshot-size", size)) => {
                    volume.snapshot_size = Some(crate::size::parse_size(size).map_err(|_| bad("bad snapshot-size"))?);
                }
                _ => return Err(bad(&format!("unknown option {pair:?}"))),
            }
        }
        Ok(volume)
    }

    /// The LV's device node.
    #[must_use]
    pub fn device(&self) -> PathBuf {
        Path::new("/dev").join(&self.vg).join(&self.lv)
    }

    fn name(&self) -> String {
        format!("{}/{}", self.vg, self.lv)
    }
}

fn lvm(args: &[&str]) -> Result<String> {
    let mut command = Command::new("lvm");
    command.args(args).env("LVM_SUPPRESS_FD_WARNINGS", "1");
    // Without a running udev (containers, minimal hosts, an agent started by sshd with a clean
    // environment) lvm would wait for device nodes nobody makes: let it make them itself.
    if !Path::new("/run/udev/control").exists() {
        command.env("DM_DISABLE_UDEV", "1");
    }
    let out = command
        .output()
        .map_err(|e| Error::new(ErrorKind::Io, format!("running lvm (package lvm2) for an lvm:// address: {e}")))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let err: Vec<&str> = err.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
        let text = err.join("; ");
        let kind = if text.contains("not found") || text.contains("Failed to find") {
            ErrorKind::NotFound
        } else if text.contains("insufficient") || text.contains("Insufficient") {
            ErrorKind::NoSpace
        } else if text.contains("in use") || text.contains("open") {
            ErrorKind::InUse
        } else {
            ErrorKind::Io
        };
        return Err(Error::new(kind, format!("lvm {}: {text}", args.join(" "))));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[derive(Deserialize)]
struct Report<T> {
    report: Vec<T>,
}

#[derive(Deserialize)]
struct Lvs {
    #[serde(default)]
    lv: Vec<LvRow>,
}

#[derive(Deserialize)]
struct Vgs {
    #[serde(default)]
    vg: Vec<VgRow>,
}

#[derive(Deserialize, Default)]
struct LvRow {
    #[serde(default)]
    lv_name: String,
    #[serde(default)]
    lv_attr: String,
    #[serde(default)]
    origin: String,
    #[serde(default)]
    segtype: String,
    #[serde(default)]
    lv_size: String,
}

#[derive(Deserialize)]
struct VgRow {
    #[serde(default)]
    vg_free: String,
}

fn bytes(field: &str) -> u64 {
    field.trim().trim_end_matches(['B', 'b']).parse().unwrap_or(0)
}

/// The LVs of `vg` (name, attributes, origin, segment type, size in bytes).
fn lvs(vg: &str) -> Result<Vec<LvRow>> {
    let text = lvm(&[
        "lvs",
        "--reportformat",
        "json",
        "--units",
        "b",
        "--nosuffix",
        "-o",
        "lv_name,lv_attr,origin,segtype,lv_size",
        vg,
    ])?;
    let report: Report<Lvs> = serde_json::from_str(&text)
        .map_err(|e| Error::new(ErrorKind::Protocol, format!("lvs --reportformat json printed something else: {e}")))?;
    Ok(report.report.into_iter().flat_map(|r| r.lv).collect())
}

fn find(volume: &Volume) -> Result<Option<LvRow>> {
    Ok(lvs(&volume.vg)?.into_iter().find(|l| l.lv_name == volume.lv))
}

fn vg_free(vg: &str) -> Result<u64> {
    let text = lvm(&["vgs", "--reportformat", "json", "--units", "b", "--nosuffix", "-o", "vg_free", vg])?;
    let report: Report<Vgs> = serde_json::from_str(&text)
        .map_err(|e| Error::new(ErrorKind::Protocol, format!("vgs --reportformat json printed something else: {e}")))?;
    Ok(report.report.into_iter().flat_map(|r| r.vg).map(|v| bytes(&v.vg_free)).next().unwrap_or(0))
}

/// The device of `lvm://VG/LV` as a source: the LV must exist.
pub fn source_device(volume: &Volume, address: &Path) -> Result<PathBuf> {
    match find(volume)? {
        Some(_) => Ok(volume.device()),
        None => Err(Error::new(
            ErrorKind::NotFound,
            format!(
                "{}: no logical volume {} (lvs {} lists those there are)",
                address.display(),
                volume.name(),
                volume.vg
            ),
        )),
    }
}

/// The device of `lvm://VG/LV` as a target, creating a missing LV of `size` bytes (linear, or
/// thin in the address's pool). Returns it and whether it was created.
pub fn target_device(volume: &Volume, address: &Path, size: Option<u64>, create: bool) -> Result<(PathBuf, bool)> {
    if find(volume)?.is_some() {
        return Ok((volume.device(), false));
    }
    let missing =
        || Error::new(ErrorKind::NotFound, format!("{}: no logical volume {}", address.display(), volume.name()));
    if !create {
        return Err(missing());
    }
    let size = size.ok_or_else(missing)?;
    let size_arg = format!("{size}b");
    if let Some(pool) = &volume.thin_pool {
        lvm(&["lvcreate", "-q", "-y", "-V", &size_arg, "-T", &format!("{}/{pool}", volume.vg), "-n", &volume.lv])?;
    } else {
        let free = vg_free(&volume.vg)?;
        if free < size {
            return Err(Error::new(
                ErrorKind::NoSpace,
                format!(
                    "{}: volume group {} has {free} bytes free, the source needs {size}; nothing was created",
                    address.display(),
                    volume.vg
                ),
            ));
        }
        lvm(&["lvcreate", "-q", "-y", "-L", &size_arg, "-n", &volume.lv, &volume.vg])?;
    }
    Ok((volume.device(), true))
}

/// Removes an LV this run created and could not fill.
pub fn remove_created(volume: &Volume) {
    let _ = lvm(&["lvremove", "-q", "-y", &volume.name()]);
}

/// A snapshot this run made; removed when dropped.
#[derive(Debug)]
pub struct Snapshot {
    vg: String,
    name: String,
    classic: bool,
}

const MARK: &str = "-blksync-snap-";

impl Snapshot {
    /// Snapshots the origin of `volume`, after removing the ones killed runs left.
    pub fn create(volume: &Volume, address: &Path) -> Result<Snapshot> {
        let all = lvs(&volume.vg)?;
        let Some(origin) = all.iter().find(|l| l.lv_name == volume.lv) else {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!("{}: no logical volume {} to snapshot", address.display(), volume.name()),
            ));
        };
        sweep(volume, &all);
        let name = format!("{}{MARK}{}", volume.lv, std::process::id());
        let classic = origin.segtype != "thin";
        if classic {
            let size = match volume.snapshot_size {
                Some(s) => s,
                None => (bytes(&origin.lv_size) / 10).max(1 << 30).min(vg_free(&volume.vg)?),
            };
            lvm(&["lvcreate", "-q", "-y", "-s", "-L", &format!("{size}b"), "-n", &name, &volume.name()]).map_err(
                |e| {
                    Error::new(
                        e.kind(),
                        format!(
                            "{}: could not snapshot {} ({e}); a smaller snapshot may fit",
                            address.display(),
                            volume.name()
                        ),
                    )
                    .with_hint(crate::error::Hint::SmallerSnapshot)
                },
            )?;
        } else {
            // A thin snapshot needs no size; -kn activates it (thin snapshots skip activation).
            lvm(&["lvcreate", "-q", "-y", "-s", "-kn", "-n", &name, &volume.name()])?;
        }
        Ok(Snapshot { vg: volume.vg.clone(), name, classic })
    }

    /// The snapshot's device node.
    #[must_use]
    pub fn device(&self) -> PathBuf {
        Path::new("/dev").join(&self.vg).join(&self.name)
    }

    /// Fails when the snapshot was invalidated (its copy-on-write area filled up while it was
    /// read): what was read from it is not the origin at snapshot time.
    pub fn check_intact(&self, address: &Path) -> Result<()> {
        if !self.classic {
            return Ok(());
        }
        let row = lvs(&self.vg)?.into_iter().find(|l| l.lv_name == self.name);
        // lv_attr's fifth character is the state: I = invalid snapshot.
        if row.as_ref().is_none_or(|r| r.lv_attr.chars().nth(4) == Some('I')) {
            return Err(Error::new(
                ErrorKind::Io,
                format!(
                    "{}: the snapshot overflowed while it was read (its copy-on-write area filled up as the origin was written), so what was read is not a consistent copy; nothing was kept as valid",
                    address.display()
                ),
            )
            .with_hint(crate::error::Hint::LargerSnapshot));
        }
        Ok(())
    }

    /// Removes the snapshot (its device must be closed), retrying while udev holds it briefly.
    pub fn remove(&self) -> Result<()> {
        let name = format!("{}/{}", self.vg, self.name);
        let mut last = None;
        for attempt in 0..5 {
            match lvm(&["lvremove", "-q", "-y", &name]) {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
                Err(e) => last = Some(e),
            }
            std::thread::sleep(std::time::Duration::from_millis(200 << attempt));
        }
        let e = last.unwrap_or_else(|| Error::protocol("lvremove"));
        Err(Error::new(
            e.kind(),
            format!("could not remove the snapshot {name} ({e}); remove it by hand: lvremove {name}"),
        ))
    }
}

impl Snapshot {
    /// Removes the snapshot now, reporting a failure (with what to run by hand).
    pub fn close(self) -> Result<()> {
        let result = self.remove();
        std::mem::forget(self);
        result
    }
}

impl Drop for Snapshot {
    fn drop(&mut self) {
        if let Err(e) = self.remove() {
            crate::endpoint::report_cleanup_failure(&e);
        }
    }
}

/// Removes snapshots of `volume` that blksync runs left when they were killed: named
/// `LV-blksync-snap-PID`, of this origin, with a PID no longer running on this host.
fn sweep(volume: &Volume, all: &[LvRow]) {
    let prefix = format!("{}{MARK}", volume.lv);
    for l in all {
        let Some(pid) = l.lv_name.strip_prefix(&prefix).and_then(|p| p.parse::<u32>().ok()) else { continue };
        if l.origin == volume.lv && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = lvm(&["lvremove", "-q", "-y", &format!("{}/{}", volume.vg, l.lv_name)]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_addresses_parse_with_their_options() {
        let a = Path::new("lvm://x");
        let v = Volume::parse("vg0/vm1", a).unwrap();
        assert_eq!((v.vg.as_str(), v.lv.as_str(), v.device()), ("vg0", "vm1", PathBuf::from("/dev/vg0/vm1")));
        let v = Volume::parse("vg/lv?thin-pool=pool&snapshot-size=2G", a).unwrap();
        assert_eq!((v.thin_pool.as_deref(), v.snapshot_size), (Some("pool"), Some(2 << 30)));
        for bad in ["vg", "/lv", "vg/", "vg/l v", "-vg/lv", "vg/lv?color=red", "vg/../x"] {
            assert!(Volume::parse(bad, a).is_err(), "{bad}");
        }
    }

    #[test]
    fn lvm_json_reports_are_read() {
        let text = r#"{"report":[{"lv":[{"lv_name":"snap","lv_attr":"swi-I-s---","origin":"o","segtype":"linear","lv_size":"8388608"}]}]}"#;
        let r: Report<Lvs> = serde_json::from_str(text).unwrap();
        let row = &r.report[0].lv[0];
        assert_eq!((row.lv_attr.chars().nth(4), bytes(&row.lv_size)), (Some('I'), 8 << 20));
    }
}
