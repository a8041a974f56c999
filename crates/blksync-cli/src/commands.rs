//! One function per subcommand: convert arguments, call the library, print results.

use std::sync::atomic::AtomicBool;

use anyhow::Result;
use blksync::compare::{CompareOptions, compare_paths};
use blksync::progress::Control;
use blksync::size::{format_rate, format_size};
use blksync::sizing::SizePolicy;
use blksync::sync::{SyncOptions, check_block_size, default_threads, sync_paths};

use crate::args::{CommonArgs, CompareArgs, SyncArgs};
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
    let result = sync_paths(&args.source, &args.dest, &options, Control { observer: &render, cancel });
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
    let result = compare_paths(&args.source, &args.dest, &options, Control { observer: &render, cancel });
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
