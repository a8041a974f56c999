//! The endpoints of blksync: regular files and block devices ([`local`]), `loop://`
//! ([`loopdev`]), `lvm://` and `lvm+snapshot://` ([`lvm`]), `nbd://` and `nbd+unix://`
//! exports (the `blksync-nbd` crate, which builds against the seam alone), iSCSI LUNs
//! (`iscsi://`, the `blksync-iscsi` crate, likewise), and a partition of
//! any of them, `ADDRESS#N` ([`partition`]). [`open_source`] and [`open_target`]
//! are the one opener, keyed by address, and return trait objects: a new endpoint kind is a
//! module here, an arm in `Address::of` and in the opener, and its scheme in
//! `location::SCHEMES`.
//!
//! Each implements `Source` and `Target` of `blksync-core`, which is all the engine, the peer and
//! the recorders see. A file that holds a compressed image (the `blksync-image` crate) is
//! recognised by its header and read and written as the disk it holds.

pub(crate) use blksync_core::{endpoint, error, location, size};

pub mod advice;
pub mod local;
pub mod loopdev;
pub mod lvm;
pub mod partition;
pub mod usage;

use std::path::Path;

use blksync_core::endpoint::{Source, Target};

/// The iSCSI initiator, for what is not an endpoint: discovery (`blksync list-targets`).
pub use blksync_iscsi as iscsi;
pub use local::OpenTarget;

/// Opens the endpoint at `address` for reading: the one opener every command and the agent use.
/// A new kind of endpoint that is not a local file or device gets its arm here.
pub fn open_source(address: &Path) -> blksync_core::Result<Box<dyn Source>> {
    if let Some(iscsi) = iscsi_address(address) {
        let (iscsi, options) = iscsi_options(iscsi)?;
        return Ok(Box::new(blksync_iscsi::Iscsi::open(&iscsi, false, &options)?));
    }
    if let Some((disk_address, selector)) = partition::split(address) {
        let disk = open_source(&disk_address)?;
        return Ok(Box::new(partition::Window::open(disk, &disk_address, selector, address)?));
    }
    if let Some(nbd) = nbd_address(address) {
        let (nbd, bitmap) = split_bitmap(nbd);
        let options = blksync_nbd::NbdOptions { bitmap, ..blksync_nbd::NbdOptions::default() };
        return Ok(Box::new(blksync_nbd::Nbd::open(&nbd, false, &options)?));
    }
    if is_image(address)? {
        return Ok(Box::new(blksync_image::Image::open(address, false)?));
    }
    Ok(Box::new(local::Local::open_source(address)?))
}

/// Opens (or creates, as `how` says) the endpoint at `address` for writing. An export is never
/// created: it is there or the server says why not.
pub fn open_target(address: &Path, how: OpenTarget) -> blksync_core::Result<Box<dyn Target>> {
    if let Some(iscsi) = iscsi_address(address) {
        if how.compress.is_some() {
            return Err(blksync_core::Error::usage(format!(
                "{}: a LUN is written in place; it cannot be a new compressed image",
                blksync_iscsi::address::redact(iscsi)
            )));
        }
        let (iscsi, options) = iscsi_options(iscsi)?;
        return Ok(Box::new(blksync_iscsi::Iscsi::open(&iscsi, !how.read_only, &options)?));
    }
    if let Some((disk_address, selector)) = partition::split(address) {
        if how.compress.is_some() {
            return Err(blksync_core::Error::usage(format!(
                "{}: a partition is written in place; it cannot be a new compressed image",
                address.display()
            )));
        }
        // The disk must be there: a partition is never created, only its table says where.
        let disk = open_target(&disk_address, OpenTarget { create: false, ..how })?;
        return Ok(Box::new(partition::Window::open(disk, &disk_address, selector, address)?));
    }
    if let Some(nbd) = nbd_address(address) {
        if split_bitmap(nbd).1.is_some() {
            return Err(blksync_core::Error::usage(format!(
                "{nbd}: a dirty bitmap says what changed in a source; a destination has none"
            )));
        }
        return Ok(Box::new(blksync_nbd::Nbd::open(nbd, !how.read_only, &blksync_nbd::NbdOptions::default())?));
    }
    if is_image(address)? {
        // Recognised by its header: a later sync updates it in place, --compress or not.
        return Ok(Box::new(blksync_image::Image::open(address, !how.read_only)?));
    }
    if let Some(level) = how.compress {
        let plain = blksync_core::location::scheme_of(address.as_os_str().as_encoded_bytes()).is_none();
        if !plain || std::fs::symlink_metadata(address).is_ok() {
            return Err(blksync_core::Error::usage(format!(
                "{}: a compressed image is created as a new file, and this {} not a compressed image",
                address.display(),
                if plain { "exists and is" } else { "is" }
            )));
        }
        if how.create && !how.read_only {
            let options =
                blksync_image::Options { level, mode: how.mode.unwrap_or(0o600), ..blksync_image::Options::default() };
            return Ok(Box::new(blksync_image::Image::create(address, 0, options)?));
        }
    }
    Ok(Box::new(local::Local::open_target(address, how)?))
}

/// Whether `address` is a file that holds a compressed image (its first bytes say so).
fn is_image(address: &Path) -> blksync_core::Result<bool> {
    if blksync_core::location::scheme_of(address.as_os_str().as_encoded_bytes()).is_some() {
        return Ok(false);
    }
    blksync_image::is_image(address)
}

/// `bitmap=NAME` in an NBD address's query (blksync's own parameter, which `--bitmap` adds):
/// the address without it, and the name of the qemu dirty bitmap to read changed blocks from.
fn split_bitmap(address: &str) -> (String, Option<String>) {
    let Some((base, query)) = address.split_once('?') else { return (address.to_string(), None) };
    let mut bitmap = None;
    let rest: Vec<&str> = query
        .split('&')
        .filter(|p| match p.strip_prefix("bitmap=") {
            Some(name) => {
                bitmap = Some(name.to_string());
                false
            }
            None => true,
        })
        .collect();
    let address = if rest.is_empty() { base.to_string() } else { format!("{base}?{}", rest.join("&")) };
    (address, bitmap)
}

/// The longest `timeout=` of an iSCSI address: a day (a target silent longer is gone).
const MAX_ISCSI_TIMEOUT: f64 = 86_400.0;

/// `address` as an `iscsi://` address, when it is one.
fn iscsi_address(address: &Path) -> Option<&str> {
    address.to_str().filter(|a| blksync_iscsi::address::is_iscsi(a))
}

/// blksync's own parameters of an iSCSI address, which `--initiator-name` and `--iscsi-secrets`
/// add so that they reach whichever host opens it (`iscsi://…/1?initiator=IQN&secrets=FILE`,
/// `digests=1`, `timeout=SECONDS`): the address without them, and the options they give.
fn iscsi_options(address: &str) -> blksync_core::Result<(String, blksync_iscsi::IscsiOptions)> {
    let mut options = blksync_iscsi::IscsiOptions::default();
    let Some((base, query)) = address.split_once('?') else { return Ok((address.to_string(), options)) };
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "initiator" => options.initiator_name = Some(value.to_string()),
            "secrets" => options.secrets_file = Some(value.into()),
            "digests" => options.digests = value != "0",
            "timeout" => {
                options.timeout = value
                    .parse::<f64>()
                    .ok()
                    .filter(|s| *s > 0.0 && *s <= MAX_ISCSI_TIMEOUT)
                    .map(std::time::Duration::from_secs_f64)
                    .ok_or_else(|| {
                        blksync_core::Error::usage(format!(
                            "{}: timeout={value}: a number of seconds, more than 0 and at most {MAX_ISCSI_TIMEOUT}",
                            blksync_iscsi::address::redact(address)
                        ))
                    })?;
            }
            _ => {
                return Err(blksync_core::Error::usage(format!(
                    "{}: unknown parameter {key:?} (initiator=, secrets=, digests=, timeout=)",
                    blksync_iscsi::address::redact(address)
                )));
            }
        }
    }
    Ok((base.to_string(), options))
}

/// `address` as an NBD URI, when it is one (`nbd://`, `nbd+unix://`, and the TLS forms, which
/// the client refuses with the way around).
fn nbd_address(address: &Path) -> Option<&str> {
    address.to_str().filter(|a| blksync_nbd::address::is_nbd(a))
}

#[cfg(test)]
mod tests {
    #[test]
    fn iscsi_parameters_are_taken_out_of_the_address() {
        let (address, o) = super::iscsi_options("iscsi://h/iqn.x:y/1?digests=1&timeout=2.5").unwrap();
        assert_eq!(address, "iscsi://h/iqn.x:y/1");
        assert!(o.digests);
        assert_eq!(o.timeout, std::time::Duration::from_millis(2500));
        let (_, o) = super::iscsi_options("iscsi://h/iqn.x:y/1").unwrap();
        assert_eq!(o.timeout, blksync_iscsi::options::DEFAULT_TIMEOUT);
        for bad in ["timeout=0", "timeout=-1", "timeout=x", "timeout=", "timeout=1e9", "timeout=NaN", "what=1"] {
            let e = super::iscsi_options(&format!("iscsi://u%hunter2@h/iqn.x:y/1?{bad}")).unwrap_err();
            assert_eq!(e.kind(), blksync_core::ErrorKind::Usage, "{bad}");
            assert!(!e.to_string().contains("hunter2"), "{e}");
        }
    }

    #[test]
    fn the_bitmap_parameter_is_taken_out_of_an_nbd_address() {
        let split = |a: &str| super::split_bitmap(a);
        assert_eq!(split("nbd://h/x"), ("nbd://h/x".into(), None));
        assert_eq!(split("nbd://h/x?bitmap=b0"), ("nbd://h/x".into(), Some("b0".into())));
        assert_eq!(
            split("nbd+unix:///x?socket=/run/s&bitmap=b0"),
            ("nbd+unix:///x?socket=/run/s".into(), Some("b0".into()))
        );
        assert_eq!(split("nbd+unix:///x?bitmap=b1&socket=/s"), ("nbd+unix:///x?socket=/s".into(), Some("b1".into())));
    }
}
