//! Command-line definitions. clap types stay in this crate; commands convert them into the
//! library's option structs.

use clap::{Args, Parser, Subcommand, ValueEnum};

/// The exit-code table, shown by `--help` and kept in sync with README.md.
pub const EXIT_CODES: &str = "\
Exit codes:
  0    success (compare: identical)
  1    compare: the images differ
  2    invalid arguments (compare: any error)
  3    I/O error: a path is missing, unreadable or unwritable, or a read/write failed
  4    no space left on the destination
  5    sizes do not allow the sync (device too small, --no-resize)
  6    destination is mounted or in use (--force overrides)
  7    --verify found a difference after syncing
  130  interrupted (Ctrl-C, SIGTERM); the destination is flushed and its synced part is correct";

/// rsync for block devices and disk images: make a destination identical to a source, moving
/// only what differs.
#[derive(Debug, Parser)]
#[command(name = "blksync", version, after_help = EXIT_CODES)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Make DST byte-identical to SRC, writing only the blocks that differ.
    ///
    /// SRC and DST are regular files or block devices. A missing DST file is created sparse; a
    /// DST that is a directory (or ends in /) receives SRC's file name. Zero blocks become holes
    /// in files and are zeroed (or, with --discard, unmapped) on devices.
    #[command(after_help = EXIT_CODES)]
    Sync(SyncArgs),
    /// Compare two images like cmp: exit 0 when identical, 1 when different, 2 on error.
    ///
    /// Prints the differing byte count and the first differing ranges (block granularity).
    #[command(after_help = EXIT_CODES)]
    Compare(CompareArgs),
}

/// Options every long-running command takes.
#[derive(Debug, Args)]
pub struct CommonArgs {
    /// Comparison granularity: a power of two from 512 to 1M.
    #[arg(long, value_name = "SIZE", default_value = "4K", value_parser = parse_size)]
    pub block_size: u64,
    /// How to show progress on stderr: a bar (on a terminal), a line every few seconds (for cron
    /// and logs), or nothing. auto picks bar on a terminal and plain otherwise.
    #[arg(long, value_enum, default_value_t = ProgressMode::Auto, value_name = "MODE")]
    pub progress: ProgressMode,
    /// Print one JSON summary on stdout at the end.
    #[arg(long)]
    pub json: bool,
    /// Keep what was read in the page cache (by default it is dropped, so a large sync does not
    /// evict everyone else's cache).
    #[arg(long)]
    pub keep_cache: bool,
    /// Worker threads (default: number of cores, 2 to 8).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=64))]
    pub threads: Option<u16>,
    /// Read the source at most RATE bytes per second (suffixes allowed: 50M), to spare a
    /// production disk.
    #[arg(long, value_name = "RATE", value_parser = parse_size)]
    pub bwlimit: Option<u64>,
    /// Print no progress, warnings or summary on stderr (errors still appear).
    #[arg(short, long)]
    pub quiet: bool,
}

/// `blksync sync`.
#[derive(Debug, Args)]
pub struct SyncArgs {
    /// Source file or block device (never written).
    #[arg(value_name = "SRC")]
    pub source: std::path::PathBuf,
    /// Destination file, block device or directory.
    #[arg(value_name = "DST")]
    pub dest: std::path::PathBuf,
    /// Report what would change; open the destination read-only and write nothing.
    #[arg(short = 'n', long)]
    pub dry_run: bool,
    /// After syncing, re-read both ends and fail (exit 7) if they differ.
    #[arg(long)]
    pub verify: bool,
    /// Refuse to sync when a destination file's size differs from the source's.
    #[arg(long, conflicts_with = "common_size")]
    pub no_resize: bool,
    /// Sync only the first min(SRC, DST) bytes and touch nothing beyond.
    #[arg(long)]
    pub common_size: bool,
    /// When the destination device is larger than the source, zero the rest of it.
    #[arg(long, conflicts_with = "common_size")]
    pub zero_tail: bool,
    /// Write to a block device even when it is mounted or in use.
    #[arg(long)]
    pub force: bool,
    /// On block devices, turn zero blocks into discards where the device guarantees they read
    /// back as zeros (thin volumes stay thin); otherwise write zeros.
    #[arg(long)]
    pub discard: bool,
    #[command(flatten)]
    pub common: CommonArgs,
}

/// `blksync compare`.
#[derive(Debug, Args)]
pub struct CompareArgs {
    /// First image.
    #[arg(value_name = "SRC")]
    pub source: std::path::PathBuf,
    /// Second image.
    #[arg(value_name = "DST")]
    pub dest: std::path::PathBuf,
    /// How many differing ranges to list.
    #[arg(long, value_name = "N", default_value_t = 20)]
    pub max_ranges: usize,
    #[command(flatten)]
    pub common: CommonArgs,
}

/// `--progress` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ProgressMode {
    /// bar on a terminal, plain otherwise.
    Auto,
    /// A progress bar.
    Bar,
    /// A line every few seconds.
    Plain,
    /// Nothing.
    None,
}

fn parse_size(text: &str) -> Result<u64, String> {
    blksync::size::parse_size(text).map_err(|e| e.to_string())
}
