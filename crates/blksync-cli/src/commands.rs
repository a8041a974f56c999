//! One function per subcommand: convert arguments, call the library, print results.

use std::sync::atomic::AtomicBool;

use anyhow::Result;
use blksync::compare::{CompareOptions, compare_paths};
use blksync::progress::Control;
use blksync::size::{format_rate, format_size};
use blksync::sizing::SizePolicy;
use blksync::sync::{SyncOptions, check_block_size, default_threads, sync_paths};

use blksync::location::Location;
use blksync::relay::{RemoteOptions, Side, compare_locations, sync_locations};
use blksync::ssh::SshOptions;

use crate::args::{AgentArgs, CommonArgs, CompareArgs, RemoteArgs, SyncArgs};
use crate::render::Render;

/// What a command reports to `main`, which turns it into the exit code.
pub enum Outcome {
    /// Exit 0.
    Success,
    /// Exit 1: compare found differences.
    Different,
}

fn threads(common: &CommonArgs) -> usize {
    common.threads.map_or_else(default_threads, usize::from)
}

fn print_json(value: &impl serde::Serialize) -> Result<()> {
    println!("{}", serde_json::to_string(value)?);
    Ok(())
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
    }
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
    };
    let render = Render::new(args.common.progress, args.common.quiet);
    let control = Control { observer: &render, cancel };
    let result = match (Location::parse(&args.source)?, Location::parse(&args.dest)?) {
        (Location::Local(src), Location::Local(dst)) => sync_paths(&src, &dst, &options, control),
        (src, dst) => {
            let remote = RemoteOptions {
                sync: options,
                compress: args.compress,
                pause: args.pause.map(std::time::Duration::from_millis),
            };
            let (s_ssh, d_ssh) = (ssh_options(&args.remote, true), ssh_options(&args.remote, false));
            sync_locations(
                &Side { location: &src, ssh: &s_ssh },
                &Side { location: &dst, ssh: &d_ssh },
                &remote,
                control,
            )
        }
    };
    render.finish();
    let summary = result?;
    let c = &summary.counters;
    let verb = if summary.dry_run { "would write" } else { "wrote" };
    render.line(&format!(
        "blksync: {} -> {}: scanned {}, {} differing in {} ranges; {verb} {} and zeroed {} in {:.2}s ({}){}",
        summary.source,
        summary.destination,
        format_size(c.bytes_scanned),
        format_size(c.bytes_differing),
        summary.ranges_differing,
        format_size(c.bytes_written),
        format_size(c.bytes_zeroed),
        c.seconds,
        format_rate(c.bytes_scanned, c.seconds),
        if summary.verified { ", verified" } else { "" },
    ));
    if summary.bytes_sent + summary.bytes_received > 0 {
        render.line(&format!(
            "blksync: over ssh: sent {}, received {}",
            format_size(summary.bytes_sent),
            format_size(summary.bytes_received)
        ));
    }
    if args.common.json {
        print_json(&summary)?;
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
    };
    let render = Render::new(args.common.progress, args.common.quiet);
    let control = Control { observer: &render, cancel };
    let result = match (Location::parse(&args.source)?, Location::parse(&args.dest)?) {
        (Location::Local(a), Location::Local(b)) => compare_paths(&a, &b, &options, control),
        (a, b) => {
            let (a_ssh, b_ssh) = (ssh_options(&args.remote, true), ssh_options(&args.remote, false));
            compare_locations(
                &Side { location: &a, ssh: &a_ssh },
                &Side { location: &b, ssh: &b_ssh },
                options.block_size,
                options.max_ranges,
                control,
            )
        }
    };
    render.finish();
    let cmp = result?;
    if args.common.json {
        print_json(&cmp)?;
    } else if cmp.identical {
        println!("{} and {} are identical ({} bytes)", cmp.source, cmp.destination, cmp.source_size);
    } else {
        println!(
            "{} and {} differ: {} bytes ({}) in {} ranges",
            cmp.source,
            cmp.destination,
            cmp.counters.bytes_differing,
            format_size(cmp.counters.bytes_differing),
            cmp.ranges_differing + u64::from(cmp.source_size != cmp.destination_size),
        );
        if cmp.source_size != cmp.destination_size {
            println!("  sizes differ: {} bytes vs {} bytes", cmp.source_size, cmp.destination_size);
        }
        for r in &cmp.ranges {
            println!("  bytes {}..{} ({})", r.offset, r.end(), format_size(r.len));
        }
        if cmp.ranges_differing > cmp.ranges.len() as u64 {
            println!("  ... and {} more ranges", cmp.ranges_differing - cmp.ranges.len() as u64);
        }
    }
    Ok(if cmp.identical { Outcome::Success } else { Outcome::Different })
}

/// `blksync agent`: never prints anything on stdout but the protocol.
pub fn agent(args: &AgentArgs) -> u8 {
    if args.protocol {
        println!("{}", blksync::protocol::VERSION);
        return 0;
    }
    blksync::agent::run()
}
