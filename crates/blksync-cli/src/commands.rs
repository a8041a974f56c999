//! One function per subcommand: convert arguments, call the library, print results.

use std::fmt::Write as _;
use std::sync::atomic::AtomicBool;

use anyhow::Result;
use blksync::compare::CompareOptions;
use blksync::progress::Control;
use blksync::sizing::SizePolicy;
use blksync::sync::{SyncOptions, check_block_size};
use serde_json::Value;

use blksync::location::Location;
use blksync::place;
use blksync::relay::{RemoteOptions, Side};
use blksync::ssh::SshOptions;

use crate::args::{
    AgentArgs, ApplyArgs, BackupArgs, CommonArgs, CompareArgs, DiffArgs, FsArgs, ImageCompress, InfoArgs, ListArgs,
    ListTargetsArgs, MergeArgs, PruneArgs, RemoteArgs, RestoreArgs, SyncArgs,
};
use crate::console;
use crate::human::{self, count, size as format_size};
use crate::json;
use crate::render::Render;

use blksync::backup::format_time;

/// What a command reports to `main`, which turns it into the exit code.
pub enum Outcome {
    /// Exit 0.
    Success,
    /// Exit 1: compare found differences.
    Different,
}

/// `--threads`, or 0: the default of whichever host does the work (a remote one has its own).
fn threads(common: &CommonArgs) -> usize {
    common.threads.map_or(0, usize::from)
}

/// "over ssh: sent …, received …", when anything crossed the wire.
fn wire_line(render: &Render, sent: u64, received: u64) {
    if sent + received > 0 {
        render.line(&format!("blksync: over ssh: sent {}, received {}", format_size(sent), format_size(received)));
    }
}

/// `--fs-aware`: what each region of the source held, and what of it was copied.
fn filesystem_lines(render: &Render, regions: &[blksync::endpoint::FsRegion]) {
    for r in regions {
        let at = format!("bytes {}..{} ({})", r.start, r.start + r.len, format_size(r.len));
        let line = match (&r.filesystem, &r.whole) {
            (_, Some(why)) => format!("{at}: copied whole, {why}"),
            (Some(fs), None) => format!(
                "{at}: {fs} ({}): the {} it uses were compared; its {} free were not read or written",
                r.detail,
                format_size(r.used),
                format_size(r.len.saturating_sub(r.used))
            ),
            (None, None) => format!("{at}: copied whole"),
        };
        render.line(&format!("blksync: fs-aware: {line}"));
    }
}

/// ssh options for the source (`source`) or destination side.
fn ssh_options(r: &RemoteArgs, source: bool) -> SshOptions {
    let mut extra = r.ssh_opt.clone();
    extra.extend(if source { r.source_ssh_opt.iter() } else { r.dest_ssh_opt.iter() }.cloned());
    SshOptions {
        rsh: r.rsh.clone(),
        extra,
        identity: if source { r.source_identity.clone() } else { r.dest_identity.clone() }
            .or_else(|| r.identity.clone()),
        sudo: r.sudo || if source { r.source_sudo } else { r.dest_sudo },
        remote_path: r.remote_path.clone(),
        no_upload: r.no_upload,
        timeout: r.timeout.map(std::time::Duration::from_secs),
    }
}

/// `sync`'s advice for the size warnings of the library, which name no flags because `restore`
/// reaches them too and has none of these.
fn sync_hint(message: &str) -> Option<&'static str> {
    if message.contains("changed while it was read") {
        return Some("--verify compares the copy");
    }
    message.contains("of the destination are left as they are").then_some("--zero-tail zeroes them")
}

/// `blksync sync`.
pub fn sync(args: &SyncArgs, cancel: &AtomicBool) -> Result<Outcome> {
    let options = SyncOptions {
        block_size: check_block_size(args.common.block_size)?,
        dry_run: args.dry_run,
        verify: args.verify,
        keep_cache: args.common.keep_cache,
        size_policy: if args.common_size {
            SizePolicy::Common
        } else if args.no_resize {
            SizePolicy::NoResize
        } else {
            SizePolicy::Resize
        },
        zero_tail: args.zero_tail,
        force: args.force,
        discard: args.discard,
        threads: threads(&args.common),
        bwlimit: args.common.bwlimit.filter(|&r| r > 0),
        undo: None,
        fs_aware: args.fs.fs_aware,
        compress: match args.compress {
            Some(ImageCompress::Image(level)) => Some(level),
            _ => None,
        },
    };
    let render = Render::new(&args.common.output, "sync").with_hint(sync_hint);
    let control = Control { observer: &render, cancel };
    let undo = args.undo.as_ref().map(Location::parse).transpose()?;
    let source = source_options(&args.source, &args.common)?;
    let dest = iscsi_options(&lvm_option(&args.dest, "lvm", "thin-pool", args.thin_pool.as_ref()), &args.common)?;
    let remote = RemoteOptions {
        sync: options,
        compress: match args.compress {
            Some(ImageCompress::Wire(wire)) => wire,
            _ => args.wire_compress,
        },
        pause: args.pause.map(std::time::Duration::from_millis),
        undo,
    };
    let (s_ssh, d_ssh) = (ssh_options(&args.remote, true), ssh_options(&args.remote, false));
    let (source, dest) = (Location::parse(&source)?, Location::parse(&dest)?);
    let result =
        place::sync(&Side { location: &source, ssh: &s_ssh }, &Side { location: &dest, ssh: &d_ssh }, &remote, control);
    render.finish();
    let summary = result?;
    let c = &summary.counters;
    let (verb, zeroed) = if summary.dry_run { ("would write", "zero") } else { ("wrote", "zeroed") };
    render.line(&format!(
        "blksync: {} -> {}: scanned {}, {} differing in {}; {verb} {} and {zeroed} {} in {:.2}s ({}){}",
        summary.source,
        summary.destination,
        format_size(c.bytes_scanned),
        format_size(c.bytes_differing),
        count(summary.ranges_differing, "range", "ranges"),
        format_size(c.bytes_written),
        format_size(c.bytes_zeroed),
        c.seconds,
        human::rate(c.bytes_scanned, c.seconds),
        match (summary.verified, summary.filesystems.is_empty()) {
            (false, _) => "",
            (true, true) => ", verified",
            (true, false) => ", verified (used blocks only)",
        },
    ));
    for line in &summary.partitions {
        render.line(&format!("blksync: {line}"));
    }
    filesystem_lines(&render, &summary.filesystems);
    wire_line(&render, summary.bytes_sent, summary.bytes_received);
    if args.common.output.json {
        let mut body = json::body(&summary)?;
        json::fill(
            &mut body,
            [
                ("undo_log", Value::Null),
                ("partitions", Value::Array(Vec::new())),
                ("filesystems", Value::Array(Vec::new())),
            ],
        );
        json::print_summary("sync", body)?;
    }
    Ok(Outcome::Success)
}

/// `blksync clone`.
pub fn clone(args: &crate::args::CloneArgs, cancel: &AtomicBool) -> Result<Outcome> {
    let options = blksync::clone::CloneOptions {
        grow: args.grow,
        temp_dir: args.temp_dir.clone(),
        block_size: check_block_size(args.common.block_size)?,
        threads: threads(&args.common),
        force: args.force,
        dry_run: args.dry_run,
    };
    let render = Render::new(&args.common.output, "clone");
    let control = Control { observer: &render, cancel };
    let (source, dest) = (Location::parse(&args.source)?, Location::parse(&args.dest)?);
    let (s_ssh, d_ssh) = (ssh_options(&args.remote, true), ssh_options(&args.remote, false));
    let result = blksync::clone::clone(
        &Side { location: &source, ssh: &s_ssh },
        &Side { location: &dest, ssh: &d_ssh },
        &options,
        control,
    );
    render.finish();
    let summary = result?;
    if summary.dry_run {
        render.line(&format!(
            "blksync: {} -> {}: dry run, nothing written; this is what a clone would do",
            summary.source, summary.destination
        ));
    } else {
        render.line(&format!(
            "blksync: {} -> {}: wrote {}{}",
            summary.source,
            summary.destination,
            format_size(summary.bytes_written),
            match (summary.table.as_deref(), summary.table_written) {
                (Some(_), _) if summary.table_kept => "; the destination's DOS table holds the source's partitions, each at least as large, and was kept: only the boot code came from the source".to_string(),
                (Some(t), true) => format!("; {} table and boot gap written", t.to_uppercase()),
                (Some(t), false) => format!("; {} table and boot gap already in place", t.to_uppercase()),
                (None, _) => String::new(),
            }
        ));
    }
    if let Some(dir) = &summary.temp_dir {
        render.line(&format!("blksync: temporary copies were built in {dir} (removed)"));
    }
    for p in &summary.partitions {
        let what = p.number.map_or_else(|| "filesystem".to_string(), |n| format!("partition {n}"));
        let id = match (&p.uuid, &p.label) {
            (Some(u), Some(l)) if !l.is_empty() => format!(" UUID={u} LABEL={l}"),
            (Some(u), _) => format!(" UUID={u}"),
            _ => String::new(),
        };
        let wrote = match p.bytes_written {
            Some(n) if !summary.dry_run => format!("; wrote {}", format_size(n)),
            _ => String::new(),
        };
        render
            .line(&format!("blksync: {what} ({}{id}): {}, at byte offset {}{wrote}", p.filesystem, p.detail, p.start));
    }
    if args.common.output.json {
        json::print_summary("clone", json::body(&summary)?)?;
    }
    Ok(Outcome::Success)
}

/// `blksync compare`.
pub fn compare(args: &CompareArgs, cancel: &AtomicBool) -> Result<Outcome> {
    let options = CompareOptions {
        block_size: check_block_size(args.common.block_size)?,
        keep_cache: args.common.keep_cache,
        threads: threads(&args.common),
        max_ranges: args.max_ranges,
        fs_aware: args.fs.fs_aware,
    };
    let render = Render::new(&args.common.output, "compare");
    let control = Control { observer: &render, cancel };
    let (a, b) = (iscsi_options(&args.source, &args.common)?, iscsi_options(&args.dest, &args.common)?);
    let (a, b) = (Location::parse(&a)?, Location::parse(&b)?);
    let (a_ssh, b_ssh) = (ssh_options(&args.remote, true), ssh_options(&args.remote, false));
    let result =
        place::compare(&Side { location: &a, ssh: &a_ssh }, &Side { location: &b, ssh: &b_ssh }, &options, control);
    render.finish();
    let cmp = result?;
    filesystem_lines(&render, &cmp.filesystems);
    if args.common.output.json {
        json::print("compare", u8::from(!cmp.identical), json::body(&cmp)?)?;
    } else if cmp.identical {
        console::out(&format!(
            "{} and {} are identical{} ({})",
            cmp.source,
            cmp.destination,
            if cmp.filesystems.is_empty() { "" } else { " in the blocks their filesystems use" },
            count(cmp.source_size, "byte", "bytes")
        ))?;
    } else {
        let mut text = format!(
            "{} and {} differ: {} ({}) in {}",
            cmp.source,
            cmp.destination,
            count(cmp.counters.bytes_differing, "byte", "bytes"),
            format_size(cmp.counters.bytes_differing),
            count(cmp.ranges_differing + u64::from(cmp.source_size != cmp.destination_size), "range", "ranges"),
        );
        if cmp.source_size != cmp.destination_size {
            write!(
                text,
                "\n  sizes differ: {} vs {}",
                count(cmp.source_size, "byte", "bytes"),
                count(cmp.destination_size, "byte", "bytes")
            )?;
        }
        for r in &cmp.ranges {
            write!(text, "\n  bytes {}..{} ({})", r.offset, r.end(), format_size(r.len))?;
        }
        if cmp.ranges_differing > cmp.ranges.len() as u64 {
            write!(
                text,
                "\n  ... and {} more",
                count(cmp.ranges_differing - cmp.ranges.len() as u64, "range", "ranges")
            )?;
        }
        console::out(&text)?;
    }
    Ok(if cmp.identical { Outcome::Success } else { Outcome::Different })
}

/// `blksync list-targets`: the targets of an iSCSI portal, one address per line.
pub fn list_targets(args: &ListTargetsArgs) -> Result<Outcome> {
    let options = blksync::endpoint::iscsi::IscsiOptions {
        initiator_name: args.initiator_name.clone(),
        secrets_file: args.iscsi_secrets.clone(),
        ..blksync::endpoint::iscsi::IscsiOptions::default()
    };
    let portal = if blksync::endpoint::iscsi::address::is_iscsi(&args.portal) {
        args.portal.clone()
    } else {
        format!("iscsi://{}", args.portal)
    };
    let targets = blksync::endpoint::iscsi::discover(&portal, &options)?;
    // The address to give blksync: the portal as asked (it answered), each target's name.
    let base = blksync::endpoint::iscsi::address::redact(&portal);
    let base = base.trim_end_matches('/');
    if args.json {
        let list: Vec<Value> = targets
            .iter()
            .map(|t| serde_json::json!({ "name": t.name, "addresses": t.addresses, "url": format!("{base}/{}", t.name) }))
            .collect();
        let mut body = json::Body::new();
        body.insert("portal".into(), Value::String(base.to_string()));
        body.insert("targets".into(), Value::Array(list));
        json::print_summary("list-targets", body)?;
    } else {
        for t in &targets {
            console::out(&format!("{base}/{}\t{}", t.name, t.addresses.join(" ")))?;
        }
    }
    Ok(Outcome::Success)
}

/// `blksync agent`: never prints anything on stdout but the protocol.
pub fn agent(args: &AgentArgs) -> u8 {
    if args.protocol {
        return if console::out(&blksync::protocol::VERSION.to_string()).is_ok() { 0 } else { 3 };
    }
    blksync::agent::run()
}

fn diff_options(common: &CommonArgs, fs: &FsArgs, comment: &str) -> Result<blksync::patch::DiffOptions> {
    Ok(blksync::patch::DiffOptions {
        block_size: check_block_size(common.block_size)?,
        threads: threads(common),
        keep_cache: common.keep_cache,
        comment: comment.to_string(),
        bwlimit: common.bwlimit.filter(|&r| r > 0),
        force: false,
        compress: None,
        fs_aware: fs.fs_aware,
    })
}

/// Carries `--snapshot-size` or `--thin-pool` into an address of `scheme` as its option
/// (`lvm+snapshot://vg/lv?snapshot-size=N`), so that it reaches whichever host opens it; other
/// arguments are returned unchanged.
fn lvm_option(
    arg: &std::ffi::OsString,
    scheme: &str,
    key: &str,
    value: Option<impl std::fmt::Display>,
) -> std::ffi::OsString {
    let (Some(value), Some(text)) = (value, arg.to_str()) else { return arg.clone() };
    let marker = format!("{scheme}://");
    let at_address =
        text.starts_with(&marker) || text.contains(&format!(":{marker}")) || text.contains(&format!("/{marker}"));
    if !at_address {
        return arg.clone();
    }
    let sep = if text.contains('?') { '&' } else { '?' };
    format!("{text}{sep}{key}={value}").into()
}

/// A source address with what its options add to it: `--snapshot-size` for lvm+snapshot://,
/// `--bitmap` for nbd:// and nbd+unix:// (which no other source takes).
fn source_options(arg: &std::ffi::OsString, common: &crate::args::CommonArgs) -> Result<std::ffi::OsString> {
    let arg = iscsi_options(&lvm_option(arg, "lvm+snapshot", "snapshot-size", common.snapshot_size), common)?;
    let Some(bitmap) = &common.bitmap else { return Ok(arg) };
    let with = lvm_option(&lvm_option(&arg, "nbd", "bitmap", Some(bitmap)), "nbd+unix", "bitmap", Some(bitmap));
    if with == arg {
        anyhow::bail!(blksync::Error::usage(format!(
            "--bitmap {bitmap}: {} is not an nbd:// or nbd+unix:// source",
            arg.to_string_lossy()
        )));
    }
    Ok(with)
}

/// An iscsi:// address with `--initiator-name` and `--iscsi-secrets` (as an absolute path: it is
/// read on the host that opens the LUN), so that they reach whichever host that is.
fn iscsi_options(arg: &std::ffi::OsString, common: &crate::args::CommonArgs) -> Result<std::ffi::OsString> {
    let secrets = match &common.iscsi_secrets {
        Some(path) if path.is_relative() => Some(std::env::current_dir()?.join(path)),
        other => other.clone(),
    };
    let arg = lvm_option(arg, "iscsi", "initiator", common.initiator_name.as_ref());
    Ok(lvm_option(&arg, "iscsi", "secrets", secrets.as_ref().map(|p| p.display())))
}

/// Parses location arguments.
fn locations(args: &[std::ffi::OsString]) -> Result<Vec<Location>> {
    Ok(args.iter().map(Location::parse).collect::<blksync::Result<_>>()?)
}

/// `blksync diff`.
pub fn diff(args: &DiffArgs, cancel: &AtomicBool) -> Result<Outcome> {
    let options = diff_options(&args.common, &args.fs, &args.comment)?;
    let render = Render::new(&args.common.output, "diff");
    let source = source_options(&args.source, &args.common)?;
    let (source, base) = (Location::parse(&source)?, Location::parse(&args.base)?);
    let (s_ssh, d_ssh) = (ssh_options(&args.remote, true), ssh_options(&args.remote, false));
    let (source_side, base_side) = (Side { location: &source, ssh: &s_ssh }, Side { location: &base, ssh: &d_ssh });
    let Some(output) = &args.output else {
        let result = blksync::estimate::diff(&source_side, &base_side, &options, Control { observer: &render, cancel });
        render.finish();
        return estimated("diff", &result?, &render, args.common.output.json);
    };
    let output = Location::parse(output)?;
    let result = blksync::relay::diff_locations(
        &source_side,
        &base_side,
        &Side { location: &output, ssh: &d_ssh },
        &options,
        Control { observer: &render, cancel },
    );
    render.finish();
    let summary = result?;
    let c = &summary.counters;
    render.line(&format!(
        "blksync: {} against {}: {} of data and {} of zeros recorded in {} ({}) in {:.2}s",
        args.source.to_string_lossy(),
        args.base.to_string_lossy(),
        format_size(c.bytes_written),
        format_size(c.bytes_zeroed),
        summary.delta,
        format_size(summary.file_size),
        c.seconds
    ));
    wire_line(&render, summary.bytes_sent, summary.bytes_received);
    if args.common.output.json {
        json::print_summary("diff", json::body(&summary)?)?;
    }
    Ok(Outcome::Success)
}

/// Prints what a dry run of `backup` or `diff` estimated.
fn estimated(command: &str, e: &blksync::estimate::Estimate, render: &Render, json: bool) -> Result<Outcome> {
    let c = &e.counters;
    render.line(&if e.new_chain {
        format!(
            "blksync: {} -> {}: no chain there yet; the first point would be a full copy holding {} of data (dry run, nothing written)",
            e.source,
            e.base,
            format_size(c.bytes_written)
        )
    } else {
        format!(
            "blksync: {} against {}: would record {} of data and {} of zeros in {}, at most {} of {} (dry run, nothing written)",
            e.source,
            e.base,
            format_size(c.bytes_written),
            format_size(c.bytes_zeroed),
            crate::human::count(e.ranges_differing, "range", "ranges"),
            format_size(e.estimated_file_size),
            if command == "backup" { "increment" } else { "delta" }
        )
    });
    wire_line(render, e.bytes_sent, e.bytes_received);
    if json {
        let mut body = json::body(e)?;
        json::fill(&mut body, [("dry_run", Value::Bool(true))]);
        json::print_summary(command, body)?;
    }
    Ok(Outcome::Success)
}

/// `blksync apply`.
pub fn apply(args: &ApplyArgs, cancel: &AtomicBool) -> Result<Outcome> {
    let all = locations(&args.paths)?;
    let (target, deltas) = all.split_last().ok_or_else(|| anyhow::anyhow!("apply needs PATCH... TARGET"))?;
    let (s_ssh, d_ssh) = (ssh_options(&args.remote, true), ssh_options(&args.remote, false));
    let deltas: Vec<Side<'_>> = deltas.iter().map(|location| Side { location, ssh: &s_ssh }).collect();
    let render = Render::new(&args.output, "apply");
    let result = blksync::relay::apply_locations(
        &deltas,
        &Side { location: target, ssh: &d_ssh },
        args.force,
        Control { observer: &render, cancel },
    );
    render.finish();
    let summary = result?;
    render.line(&format!(
        "blksync: applied {} to {}: wrote {}, zeroed {}",
        count(summary.deltas.len() as u64, "delta", "deltas"),
        summary.target,
        format_size(summary.counters.bytes_written),
        format_size(summary.counters.bytes_zeroed)
    ));
    if args.output.json {
        json::print_summary("apply", json::body(&summary)?)?;
    }
    Ok(Outcome::Success)
}

/// `blksync merge`.
pub fn merge(args: &MergeArgs, cancel: &AtomicBool) -> Result<Outcome> {
    let inputs = locations(&args.inputs)?;
    let output = Location::parse(&args.output)?;
    let (s_ssh, d_ssh) = (ssh_options(&args.remote, true), ssh_options(&args.remote, false));
    let sides: Vec<Side<'_>> = inputs.iter().map(|location| Side { location, ssh: &s_ssh }).collect();
    let render = Render::new(&args.out, "merge");
    let result = blksync::relay::merge_locations(
        &sides,
        &Side { location: &output, ssh: &d_ssh },
        Control { observer: &render, cancel },
    );
    render.finish();
    let info = result?;
    if args.out.json {
        json::print_summary("merge", json::body(&info)?)?;
    } else {
        render.line(&format!(
            "blksync: merged {} into {} ({}, {})",
            count(inputs.len() as u64, "delta", "deltas"),
            info.path,
            format_size(info.file_size),
            count(info.records, "record", "records")
        ));
    }
    Ok(Outcome::Success)
}

/// `blksync info`.
pub fn info(args: &InfoArgs, cancel: &AtomicBool) -> Result<Outcome> {
    let location = Location::parse(&args.path)?;
    let ssh = ssh_options(&args.remote, true);
    let control = Control { observer: &blksync::progress::Silent, cancel };
    let info = blksync::relay::info_location(&Side { location: &location, ssh: &ssh }, control)?;
    if args.json {
        json::print("info", 0, json::body(&info)?)?;
        return Ok(Outcome::Success);
    }
    let h = &info.header;
    let hex = blksync::delta::to_hex;
    let mut lines = vec![
        format!("delta        {} ({}, valid)", info.path, format_size(info.file_size)),
        format!("id           {}", hex(&h.id)),
    ];
    if h.parent != [0; 16] {
        lines.push(format!("parent       {}", hex(&h.parent)));
    }
    lines.push(format!("created      {}", format_time(h.created, h.utc_offset)));
    lines.push(format!("sizes        {} -> {}", h.size_before, count(h.size_after, "byte", "bytes")));
    lines.push(format!("block size   {}", h.block_size));
    lines.push(format!("source       {}", h.source));
    if !h.comment.is_empty() {
        lines.push(format!("comment      {}", h.comment));
    }
    lines.push(format!(
        "records      {} ({} of data, {} of zeros)",
        info.records,
        format_size(info.data_bytes),
        format_size(info.zero_bytes)
    ));
    lines.push(format!("written by   blksync {}", h.tool_version));
    console::out(&lines.join("\n"))?;
    Ok(Outcome::Success)
}

/// `blksync backup`.
pub fn backup(args: &BackupArgs, cancel: &AtomicBool) -> Result<Outcome> {
    let render = Render::new(&args.common.output, "backup");
    let control = Control { observer: &render, cancel };
    let source_arg = source_options(&args.source, &args.common)?;
    let (source, dest) = (Location::parse(&source_arg)?, Location::parse(&args.dest)?);
    let options = blksync::patch::DiffOptions {
        force: args.force,
        compress: args.compress,
        ..diff_options(&args.common, &args.fs, &args.comment)?
    };
    let (s_ssh, d_ssh) = (ssh_options(&args.remote, true), ssh_options(&args.remote, false));
    if args.dry_run {
        let result = blksync::estimate::backup(
            &Side { location: &source, ssh: &s_ssh },
            &Side { location: &dest, ssh: &d_ssh },
            &options,
            control,
        );
        render.finish();
        return estimated("backup", &result?, &render, args.common.output.json);
    }
    let result = place::backup(
        &Side { location: &source, ssh: &s_ssh },
        &Side { location: &dest, ssh: &d_ssh },
        &options,
        control,
    );
    render.finish();
    let b = result?;
    let s = &b.summary;
    let what = match (b.number, &b.file) {
        (Some(number), Some(file)) => format!("point {number} ({file})"),
        _ => s.destination.clone(),
    };
    let wire = if s.bytes_sent + s.bytes_received > 0 {
        format!("; over ssh: sent {}, received {}", format_size(s.bytes_sent), format_size(s.bytes_received))
    } else {
        String::new()
    };
    render.line(&format!(
        "blksync: {} -> {what}: {} changed in {:.2}s{wire}",
        s.source,
        format_size(s.counters.bytes_written + s.counters.bytes_zeroed),
        s.counters.seconds,
    ));
    if args.common.output.json {
        let mut body = json::body(&b)?;
        json::fill(&mut body, [("undo_log", Value::Null), ("filesystems", Value::Array(Vec::new()))]);
        json::print_summary("backup", body)?;
    }
    Ok(Outcome::Success)
}

/// `blksync list`.
pub fn list(args: &ListArgs, cancel: &AtomicBool) -> Result<Outcome> {
    let location = Location::parse(&args.dest)?;
    let ssh = ssh_options(&args.remote, false);
    let control = Control { observer: &blksync::progress::Silent, cancel };
    let points = blksync::relay::list_location(&Side { location: &location, ssh: &ssh }, args.verify, control)?;
    if args.json {
        json::print("list", 0, json::field("points", &points)?)?;
        return Ok(Outcome::Success);
    }
    let mut text =
        format!("{:>6}  {:<26}  {:>10}  {:>10}  {:>10}  comment", "point", "created", "changed", "size", "stored");
    for (i, p) in points.iter().enumerate() {
        // The first point is the base (point 0, or a later one after pruning).
        let label = if i == 0 { format!("{} base", p.number) } else { p.number.to_string() };
        write!(
            text,
            "\n{:>6}  {:<26}  {:>10}  {:>10}  {:>10}  {}",
            label,
            format_time(p.created, p.utc_offset),
            format_size(p.bytes_changed),
            format_size(p.size),
            format_size(p.file_size),
            p.comment
        )?;
    }
    console::out(&text)?;
    Ok(Outcome::Success)
}

/// Reads `--at`: a point number, or a time that GNU `date -d` understands (it knows local time
/// zones and many forms: "2026-11-20 03:00", "yesterday 18:00"). Anything else is a usage error.
fn parse_at(text: Option<&str>) -> Result<blksync::backup::At> {
    use blksync::backup::At;
    let Some(text) = text else { return Ok(At::Latest) };
    // `date -d ""` is today's midnight: an empty --at is a mistake, not a time.
    if text.trim().is_empty() {
        return Err(blksync::Error::usage("--at is empty: give a point number (see `blksync list`) or a time").into());
    }
    if let Ok(n) = text.trim().parse::<u64>() {
        return Ok(At::Number(n));
    }
    let out = std::process::Command::new("date")
        .args(["-d", text, "+%s"])
        .output()
        .map_err(|e| blksync::Error::usage(format!("--at {text:?}: cannot run date -d to read the time: {e}")))?;
    let secs = String::from_utf8_lossy(&out.stdout).trim().parse::<i64>().ok().filter(|_| out.status.success());
    secs.map(At::Time).ok_or_else(|| {
        blksync::Error::usage(format!("--at {text:?} is neither a point number nor a time that date -d understands"))
            .into()
    })
}

/// `blksync restore`.
pub fn restore(args: &RestoreArgs, cancel: &AtomicBool) -> Result<Outcome> {
    let at = parse_at(args.at.as_deref())?;
    let target_arg = lvm_option(&args.target, "lvm", "thin-pool", args.thin_pool.as_ref());
    let (dest, target) = (Location::parse(&args.dest)?, Location::parse(&target_arg)?);
    if args.target == "-" && args.output.json {
        // Nothing is printed on stdout, not even the error document: it would become part of
        // the image in `restore DEST - --json | dd of=/dev/sdb`.
        return Err(blksync::Error::usage(
            "--json needs standard output for its document, and TARGET - writes the image there; \
             restore to a file or device instead",
        )
        .into());
    }
    if args.target == "-" && std::io::IsTerminal::is_terminal(&std::io::stdout()) {
        return Err(
            blksync::Error::usage("refusing to write a disk image to a terminal; redirect standard output").into()
        );
    }
    let render = Render::new(&args.output, "restore");
    let control = Control { observer: &render, cancel };
    let (c_ssh, t_ssh) = (ssh_options(&args.remote, true), ssh_options(&args.remote, false));
    let chain = Side { location: &dest, ssh: &c_ssh };
    if place::is_stdio(&target) {
        let mut out = std::io::stdout().lock();
        let result = place::restore_to(&chain, at, &mut out, control);
        render.finish();
        result?;
        return Ok(Outcome::Success);
    }
    let result = place::restore(&chain, at, &Side { location: &target, ssh: &t_ssh }, args.force, control);
    render.finish();
    let s = result?;
    render.line(&format!(
        "blksync: restored {} to {}: wrote {}, zeroed {} in {:.2}s",
        s.source,
        s.destination,
        format_size(s.counters.bytes_written),
        format_size(s.counters.bytes_zeroed),
        s.counters.seconds
    ));
    if args.output.json {
        let mut body = json::body(&s)?;
        json::fill(&mut body, [("undo_log", Value::Null)]);
        json::print_summary("restore", body)?;
    }
    Ok(Outcome::Success)
}

/// `blksync prune`.
pub fn prune(args: &PruneArgs, cancel: &AtomicBool) -> Result<Outcome> {
    let options = diff_options(&args.common, &FsArgs { fs_aware: false }, "")?;
    let render = Render::new(&args.common.output, "prune");
    let location = Location::parse(&args.dest)?;
    let ssh = ssh_options(&args.remote, false);
    let result = blksync::relay::prune_location(
        &Side { location: &location, ssh: &ssh },
        args.keep,
        &options,
        Control { observer: &render, cancel },
    );
    render.finish();
    let s = result?;
    render.line(&format!(
        "blksync: folded {} into the base (now point {}); {} kept",
        count(s.folded, "increment", "increments"),
        s.base_number,
        s.kept
    ));
    if args.common.output.json {
        json::print_summary("prune", json::body(&s)?)?;
    }
    Ok(Outcome::Success)
}

/// `blksync completions SHELL`: the script, generated from the CLI definition.
pub fn completions(args: &crate::args::CompletionsArgs) -> Result<Outcome> {
    use clap::CommandFactory;
    let mut command = crate::args::Cli::command();
    let mut out = Vec::new();
    clap_complete::generate(args.shell, &mut command, "blksync", &mut out);
    console::out(String::from_utf8_lossy(&out).trim_end())?;
    Ok(Outcome::Success)
}

/// `blksync man`: the man page, generated from the CLI definition.
pub fn man() -> Result<Outcome> {
    use clap::CommandFactory;
    let mut out = Vec::new();
    clap_mangen::Man::new(crate::args::Cli::command()).render(&mut out)?;
    console::out(String::from_utf8_lossy(&out).trim_end())?;
    Ok(Outcome::Success)
}

/// `blksync serve`.
pub fn serve(args: &crate::args::ServeArgs, cancel: &AtomicBool) -> Result<Outcome> {
    let address = match Location::parse(&args.address)? {
        Location::Local(path) => path,
        Location::Remote(r) => anyhow::bail!(blksync::Error::usage(format!(
            "{}: serve runs on the host that holds it: ssh {} blksync serve {}",
            r.display(),
            r.destination(),
            r.path.display()
        ))),
    };
    let listen = match (&args.socket, &args.listen) {
        (Some(path), _) => blksync::serve::Listen::Unix(path.clone()),
        (None, Some(address)) => blksync::serve::Listen::Tcp { address: address.clone(), explicit: true },
        (None, None) => blksync::serve::Listen::default(),
    };
    let at = match &args.at {
        Some(text) => Some(parse_at(Some(text))?),
        None => None,
    };
    let options =
        blksync::serve::ServeOptions { at, writable: args.writable, save_overlay: args.save_overlay.clone(), listen };
    let quiet = args.quiet;
    let shown = address.display().to_string();
    let mut printed = Ok(());
    let served = blksync::serve::serve(
        &address,
        &options,
        |uri| {
            printed = console::out(uri);
            if !quiet {
                console::err(&format!("blksync: serving {shown} at {uri} until interrupted (Ctrl-C)"));
            }
        },
        Control { observer: &blksync::progress::Silent, cancel },
    )?;
    printed?;
    if !quiet {
        console::err("blksync: stopped serving");
        if let Some((path, bytes)) = &served.saved {
            console::err(&format!(
                "blksync: what clients wrote ({}) is saved in {}; `blksync apply` lays it on a restore of the point",
                blksync::size::format_size(*bytes),
                path.display()
            ));
        }
    }
    Ok(Outcome::Success)
}

#[cfg(test)]
mod tests {
    #[test]
    fn times_format_as_calendar_dates() {
        assert_eq!(blksync::backup::format_time(0, 0), "1970-01-01 00:00:00 +00:00");
        assert_eq!(blksync::backup::format_time(951_782_400, 3600), "2000-02-29 01:00:00 +01:00");
        assert_eq!(blksync::backup::format_time(1_795_324_749, -16_200), "2026-11-22 00:49:09 -04:30");
    }

    #[test]
    fn lvm_options_ride_on_the_address_wherever_it_is() {
        let with =
            |a: &str| super::lvm_option(&a.into(), "lvm+snapshot", "snapshot-size", Some(4096)).into_string().unwrap();
        assert_eq!(with("lvm+snapshot://vg/lv"), "lvm+snapshot://vg/lv?snapshot-size=4096");
        assert_eq!(with("root@h:lvm+snapshot://vg/lv"), "root@h:lvm+snapshot://vg/lv?snapshot-size=4096");
        assert_eq!(with("ssh://h/lvm+snapshot://vg/lv?x=1"), "ssh://h/lvm+snapshot://vg/lv?x=1&snapshot-size=4096");
        assert_eq!(with("lvm://vg/lv"), "lvm://vg/lv");
        assert_eq!(with("/dev/vg/lv"), "/dev/vg/lv");
    }
}
