//! Command-line definitions. clap types stay in this crate; commands convert them into the
//! library's option structs.

// Doc comments here are `--help` text, where `[USER@]HOST:PATH` is usage notation, not a link.
#![allow(rustdoc::broken_intra_doc_links)]

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// The exit-code table, shown by `--help` and kept in sync with README.md.
macro_rules! exit_codes {
    () => {
        "\
Exit codes:
  0    success (compare: identical)
  1    compare: the images differ
  2    invalid arguments (compare: any error)
  3    I/O error: a path is missing, unreadable or unwritable, or a read/write failed
  4    no space left on the destination
  5    sizes do not allow the sync (device too small, --no-resize)
  6    destination is mounted or in use (--force overrides)
  7    --verify found a difference after syncing
  8    remote failure: ssh or the agent could not start, the connection broke, protocol error
  9    a delta file is corrupt, truncated or not a delta
  10   a delta does not fit the target (other size or content); nothing of it was written
  130  interrupted (Ctrl-C, SIGTERM); the destination is flushed and its synced part is correct"
    };
}

/// The exit codes, after every subcommand's help.
pub const EXIT_CODES: &str = exit_codes!();

/// What an endpoint address can be, then the exit codes: after the help of the commands that
/// take addresses.
pub const ADDRESSES: &str = concat!(
    "\
Addresses (SRC, DST, ADDRESS):
  PATH                                   a file or block device
  loop://FILE, loop://DEVICE             an image through a loop device
  lvm://VG/LV, lvm+snapshot://VG/LV      a logical volume; a snapshot of one (source)
  nbd://HOST[:PORT]/EXPORT               an NBD export; nbd+unix:///EXPORT?socket=PATH
  ADDRESS#N                              partition N of the disk at ADDRESS (DOS or GPT)
  ADDRESS#name=NAME, ADDRESS#partuuid=U  a GPT partition by name; any partition by PARTUUID
  [USER@]HOST:ADDRESS, ssh://[USER@]HOST[:PORT]/ADDRESS   any of these on another host

",
    exit_codes!()
);

/// rsync for block devices and disk images: make a destination identical to a source, moving
/// only what differs.
#[derive(Debug, Parser)]
#[command(name = "blksync", version, after_help = ADDRESSES)]
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
    #[command(after_help = ADDRESSES)]
    Sync(SyncArgs),
    /// Copy a disk, a partition or a filesystem onto a destination of another size,
    /// filesystem by filesystem (docs/CLONE.md).
    ///
    /// SRC DST: a disk onto a disk (the table copied, fitted, and the last partition, or the one
    /// --grow names, resized to fill the destination), a partition onto a partition (DISK#N),
    /// or a filesystem image onto a partition. Either end may be remote: both on one host
    /// (HOST:DISK HOST:DISK, where the clone then runs), a local source onto a remote disk or
    /// partition (built here in a sparse staging image in --temp-dir, then synced), or a remote
    /// source (its used blocks pulled into a staging copy here). Only the used blocks of ext2/3/4 and
    /// swap are read and written; ext filesystems are grown or shrunk with resize2fs on a
    /// temporary sparse copy (never on SRC), swap areas of another size are made anew with
    /// mkswap keeping UUID and label, anything else is copied whole. Refused before any write
    /// (exit 5) when the used data does not fit, saying how much room it needs.
    #[command(after_help = CLONE_EXAMPLES)]
    Clone(CloneArgs),
    /// Compare two images like cmp: exit 0 when identical, 1 when different, 2 on error.
    ///
    /// Prints the differing byte count and the first differing ranges (block granularity).
    #[command(after_help = ADDRESSES)]
    Compare(CompareArgs),
    /// Write a delta (patch) file that turns BASE into SRC.
    #[command(after_help = ADDRESSES)]
    Diff(DiffArgs),
    /// Apply one delta, or a chain in order, to TARGET. Every delta is validated, and the
    /// target's content checked against it, before anything is written.
    #[command(after_help = EXIT_CODES, override_usage = "blksync apply [OPTIONS] PATCH... TARGET")]
    Apply(ApplyArgs),
    /// Merge consecutive deltas into one with the same effect as applying them in order.
    #[command(after_help = EXIT_CODES)]
    Merge(MergeArgs),
    /// Validate a delta file and print its header and statistics.
    #[command(after_help = EXIT_CODES)]
    Info(InfoArgs),
    /// Back SRC up into the chain in DEST: a full sparse copy the first time, then an increment
    /// holding only what changed since the newest point.
    #[command(after_help = ADDRESSES)]
    Backup(BackupArgs),
    /// List the points of the backup chain in DEST.
    #[command(after_help = EXIT_CODES)]
    List(ListArgs),
    /// Restore a point of the backup chain in DEST onto TARGET (a file, a device, or - for
    /// stdout). Only what differs from TARGET is written.
    #[command(after_help = ADDRESSES)]
    Restore(RestoreArgs),
    /// Fold the oldest increments of the chain in DEST into its base, keeping N increments.
    #[command(after_help = EXIT_CODES)]
    Prune(PruneArgs),
    /// Export ADDRESS over NBD until Ctrl-C: a file, a device, any endpoint address, or a point
    /// of the backup chain in a directory, read through the chain without restoring it.
    ///
    /// Prints the address clients use (`nbd://127.0.0.1:10809/` by default) on stdout. Clients:
    /// qemu (`-drive file=nbd://…`), nbdcopy, nbdinfo, qemu-img, nbdfuse, nbd-client.
    #[command(after_help = ADDRESSES)]
    Serve(ServeArgs),
    /// List the targets of an iSCSI portal (`SendTargets` discovery), with the addresses to sync
    /// to or from: iscsi://[USER@]HOST[:PORT]. Credentials as for iscsi:// endpoints.
    #[command(after_help = EXIT_CODES)]
    ListTargets(ListTargetsArgs),
    /// Print a completion script for SHELL on stdout (bash, zsh, fish, elvish, powershell).
    ///
    /// bash: `blksync completions bash > /etc/bash_completion.d/blksync`; zsh: into a directory
    /// of `$fpath` as `_blksync`; fish: `~/.config/fish/completions/blksync.fish`.
    Completions(CompletionsArgs),
    /// Print the man page (roff) on stdout: `blksync man > /usr/local/share/man/man1/blksync.1`.
    Man,
    /// The far end of a remote sync, speaking the protocol on stdin/stdout (started over ssh).
    #[command(hide = true)]
    Agent(AgentArgs),
}

/// `blksync list-targets`.
#[derive(Debug, Args)]
pub struct ListTargetsArgs {
    /// The portal: iscsi://[USER@]HOST[:PORT] (or HOST[:PORT]).
    #[arg(value_name = "PORTAL")]
    pub portal: String,
    /// The initiator name to log in with (default iqn.2024-01.org.blksync:HOSTNAME).
    #[arg(long, value_name = "IQN")]
    pub initiator_name: Option<String>,
    /// A file of CHAP secrets, as for iscsi:// endpoints (`--iscsi-secrets`).
    #[arg(long, value_name = "FILE")]
    pub iscsi_secrets: Option<std::path::PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `blksync completions`.
#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

impl Command {
    /// The subcommand's name, the `command` of its `--json` document.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Sync(_) => "sync",
            Command::Clone(_) => "clone",
            Command::Compare(_) => "compare",
            Command::Diff(_) => "diff",
            Command::Apply(_) => "apply",
            Command::Merge(_) => "merge",
            Command::Info(_) => "info",
            Command::Backup(_) => "backup",
            Command::List(_) => "list",
            Command::Restore(_) => "restore",
            Command::Prune(_) => "prune",
            Command::Serve(_) => "serve",
            Command::ListTargets(_) => "list-targets",
            Command::Completions(_) => "completions",
            Command::Man => "man",
            Command::Agent(_) => "agent",
        }
    }

    /// Whether the run prints a `--json` document on stdout. `restore DEST -` never does: its
    /// stdout is the image, and a document there would end up in it.
    pub fn json(&self) -> bool {
        match self {
            Command::Sync(a) => a.common.output.json,
            Command::Clone(a) => a.common.output.json,
            Command::Compare(a) => a.common.output.json,
            Command::Diff(a) => a.common.output.json,
            Command::Apply(a) => a.output.json,
            Command::Merge(a) => a.out.json,
            Command::Info(a) => a.json,
            Command::Backup(a) => a.common.output.json,
            Command::List(a) => a.json,
            Command::Restore(a) => a.output.json && a.target != "-",
            Command::Prune(a) => a.common.output.json,
            Command::ListTargets(a) => a.json,
            Command::Serve(_) | Command::Completions(_) | Command::Man | Command::Agent(_) => false,
        }
    }
}

/// `blksync diff`.
#[derive(Debug, Args)]
pub struct DiffArgs {
    /// The new image (local or [USER@]HOST:PATH).
    #[arg(value_name = "SRC")]
    pub source: OsString,
    /// The old image the delta will apply to (local or remote).
    #[arg(value_name = "BASE")]
    pub base: OsString,
    /// The delta file to write (local or remote; written on BASE's host, then copied if elsewhere).
    #[arg(short, long, value_name = "PATCH", required_unless_present = "dry_run")]
    pub output: Option<OsString>,
    /// Free text stored in the delta's header.
    #[arg(long, value_name = "TEXT", default_value = "")]
    pub comment: String,
    /// Say what the delta would record and how large it would be at most; write nothing.
    #[arg(short = 'n', long, conflicts_with = "output")]
    pub dry_run: bool,
    #[command(flatten)]
    pub fs: FsArgs,
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub remote: RemoteArgs,
}

/// `blksync apply`.
#[derive(Debug, Args)]
pub struct ApplyArgs {
    /// Delta files, in the order to apply them, then the target (each local or
    /// [USER@]HOST:PATH; the deltas are applied on the target's host).
    #[arg(value_name = "PATH", num_args = 2.., required = true)]
    pub paths: Vec<OsString>,
    /// Write to a block device even when it is mounted or in use.
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub output: OutputArgs,
    #[command(flatten)]
    pub remote: RemoteArgs,
}

/// `blksync backup`.
#[derive(Debug, Args)]
pub struct BackupArgs {
    /// The image to back up (local or [USER@]HOST:PATH).
    #[arg(value_name = "SRC")]
    pub source: OsString,
    /// The chain's directory, created if missing (local or remote).
    #[arg(value_name = "DEST")]
    pub dest: OsString,
    /// Free text stored with this point.
    #[arg(long, value_name = "TEXT", default_value = "")]
    pub comment: String,
    /// Back up SRC even if it does not look like the image the chain holds (another filesystem
    /// UUID, or another path and size): the next point is then all new.
    #[arg(long)]
    pub force: bool,
    /// Say what the next point would record and how large it would be at most; write nothing.
    #[arg(short = 'n', long)]
    pub dry_run: bool,
    /// A new chain keeps its base as a compressed image (zstd at LEVEL, default 3;
    /// docs/COMPRESSED-IMAGE.md) instead of a raw copy. Restore, prune and serve read it; a
    /// prune folds increments into it in place. Later points are deltas either way.
    #[arg(long, value_name = "LEVEL", num_args = 0..=1, require_equals = true, default_missing_value = "3",
          value_parser = parse_level)]
    pub compress: Option<i32>,
    #[command(flatten)]
    pub fs: FsArgs,
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub remote: RemoteArgs,
}

/// `blksync list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// The chain's directory (local or [USER@]HOST:PATH).
    #[arg(value_name = "DEST")]
    pub dest: OsString,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Also check every file of the chain in full (whole-file hashes, every record), as a restore
    /// does; a damaged file is an error (exit 9).
    #[arg(long)]
    pub verify: bool,
    #[command(flatten)]
    pub remote: RemoteArgs,
}

/// `blksync restore`.
#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// The chain's directory (local or remote).
    #[arg(value_name = "DEST")]
    pub dest: OsString,
    /// Where to restore: a file, a block device (local or remote), or - for standard output.
    #[arg(value_name = "TARGET")]
    pub target: OsString,
    /// Which point: a number from `list`, or a time (anything `date -d` understands, e.g.
    /// "2026-11-20 03:00" or "yesterday 18:00"): the newest point at or before it. Default: the
    /// newest point.
    #[arg(long, value_name = "N|TIME")]
    pub at: Option<String>,
    /// Write to a block device even when it is mounted or in use.
    #[arg(long)]
    pub force: bool,
    /// For an lvm:// destination that does not exist: create it thin, in this pool of its
    /// volume group (default: a linear LV).
    #[arg(long, value_name = "POOL")]
    pub thin_pool: Option<String>,
    #[command(flatten)]
    pub output: OutputArgs,
    #[command(flatten)]
    pub remote: RemoteArgs,
}

/// `blksync serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// A file, a block device, an endpoint address (lvm://, nbd://…), or a backup chain's
    /// directory, on this host.
    #[arg(value_name = "ADDRESS")]
    pub address: OsString,
    /// For a chain: which point (a number from `list`, or a time; default: the newest).
    #[arg(long, value_name = "N|TIME")]
    pub at: Option<String>,
    /// Listen on HOST:PORT (default 127.0.0.1:10809). Naming another address than loopback
    /// here is what allows it.
    #[arg(long, value_name = "HOST:PORT", conflicts_with = "socket")]
    pub listen: Option<String>,
    /// Listen on a unix socket at PATH instead.
    #[arg(long, value_name = "PATH")]
    pub socket: Option<std::path::PathBuf>,
    /// Let clients write: to a file, a device or an export directly; to a chain's point in a
    /// copy-on-write overlay that never touches the chain and is thrown away at the end.
    #[arg(long)]
    pub writable: bool,
    /// With --writable on a chain's point: when the server stops, save what clients wrote as a
    /// delta in FILE (`blksync apply FILE` lays it on a restore of the point). The overlay's
    /// working file is made, unlinked, in FILE's directory.
    #[arg(long, value_name = "FILE", requires = "writable")]
    pub save_overlay: Option<std::path::PathBuf>,
    /// Print only errors on stderr.
    #[arg(short, long)]
    pub quiet: bool,
}

/// `blksync prune`.
#[derive(Debug, Args)]
pub struct PruneArgs {
    /// The chain's directory (local or [USER@]HOST:PATH; a remote chain is pruned there).
    #[arg(value_name = "DEST")]
    pub dest: OsString,
    /// How many increments to keep.
    #[arg(long, value_name = "N")]
    pub keep: u64,
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub remote: RemoteArgs,
}

/// `blksync merge`.
#[derive(Debug, Args)]
pub struct MergeArgs {
    /// The deltas, oldest first (each local or [USER@]HOST:PATH).
    #[arg(value_name = "DELTA", required = true, num_args = 1..)]
    pub inputs: Vec<OsString>,
    /// The merged delta to write (local or remote).
    #[arg(short, long, value_name = "FILE")]
    pub output: OsString,
    #[command(flatten)]
    pub out: OutputArgs,
    #[command(flatten)]
    pub remote: RemoteArgs,
}

/// `blksync info`.
#[derive(Debug, Args)]
pub struct InfoArgs {
    /// The delta file (local or [USER@]HOST:PATH).
    #[arg(value_name = "FILE")]
    pub path: OsString,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub remote: RemoteArgs,
}

/// `blksync agent`.
#[derive(Debug, Args)]
pub struct AgentArgs {
    /// Print the protocol version and exit (the bootstrap script uses it).
    #[arg(long)]
    pub protocol: bool,
}

/// How to reach remote endpoints (`[user@]host:path`, `ssh://[user@]host[:port]/path`).
#[derive(Debug, Args)]
pub struct RemoteArgs {
    /// The whole ssh command, like rsync's -e (default: ssh).
    #[arg(short = 'e', long, value_name = "CMD")]
    pub rsh: Option<String>,
    /// An extra ssh argument for both sides (repeatable), e.g. --ssh-opt='-o Compression=no'.
    #[arg(long, value_name = "OPT", allow_hyphen_values = true)]
    pub ssh_opt: Vec<String>,
    /// An extra ssh argument for the source side only (repeatable).
    #[arg(long, value_name = "OPT", allow_hyphen_values = true)]
    pub source_ssh_opt: Vec<String>,
    /// An extra ssh argument for the destination side only (repeatable).
    #[arg(long, value_name = "OPT", allow_hyphen_values = true)]
    pub dest_ssh_opt: Vec<String>,
    /// ssh identity file for both sides.
    #[arg(short = 'i', long, value_name = "FILE")]
    pub identity: Option<PathBuf>,
    /// ssh identity file for the source side.
    #[arg(long, value_name = "FILE")]
    pub source_identity: Option<PathBuf>,
    /// ssh identity file for the destination side.
    #[arg(long, value_name = "FILE")]
    pub dest_identity: Option<PathBuf>,
    /// Run the remote agents under `sudo -n` (both sides).
    #[arg(long)]
    pub sudo: bool,
    /// Run the source's remote agent under `sudo -n`.
    #[arg(long)]
    pub source_sudo: bool,
    /// Run the destination's remote agent under `sudo -n`.
    #[arg(long)]
    pub dest_sudo: bool,
    /// The blksync binary on the remote host (default: blksync on PATH, then the upload cache).
    #[arg(long, value_name = "PATH")]
    pub remote_path: Option<String>,
    /// Never upload this binary to a host that lacks a matching blksync.
    #[arg(long)]
    pub no_upload: bool,
    /// End the run with an error when a remote agent stays silent, or a transfer makes no
    /// progress, for SECONDS (as rsync's --timeout). Without it a silent agent is given up
    /// after 30 s (it says it is alive every 5 s), and a slow but live transfer never times out.
    #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout: Option<u64>,
}

/// `--fs-aware`, for the commands that copy or compare an image's content.
#[derive(Debug, Args)]
pub struct FsArgs {
    /// Read, send and write only the blocks the source's filesystems use: for ext2, ext3 and
    /// ext4 their allocated blocks, for swap its header; each partition of a disk on its own.
    /// Free blocks stay holes in a new copy and are left as they are in an existing one.
    /// Anything not recognised, or damaged, is copied whole (the summary says which).
    /// --verify and compare then compare used blocks only. docs/FILESYSTEMS.md
    #[arg(long)]
    pub fs_aware: bool,
}

/// Options every long-running command takes.
#[derive(Debug, Args)]
pub struct CommonArgs {
    /// Comparison granularity: a power of two from 512 to 1M.
    #[arg(long, value_name = "SIZE", default_value = "4K", value_parser = parse_size)]
    pub block_size: u64,
    #[command(flatten)]
    pub output: OutputArgs,
    /// Keep what was read in the page cache (by default it is dropped, so a large sync does not
    /// evict everyone else's cache).
    #[arg(long)]
    pub keep_cache: bool,
    /// Worker threads (default: number of cores, 2 to 8).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=64))]
    pub threads: Option<u16>,
    /// Read the source at most RATE per second, to spare a production disk: a bare number is
    /// KiB/s, as with rsync; a suffix gives another unit (50M, or 100B for bytes).
    #[arg(long, value_name = "RATE", value_parser = parse_rate)]
    pub bwlimit: Option<u64>,
    /// For an lvm+snapshot:// source: the size of the snapshot's copy-on-write area, which must
    /// hold everything written to the origin while it is read (default: a tenth of the origin,
    /// at least 1G, at most the volume group's free space). Thin snapshots need none.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub snapshot_size: Option<u64>,
    /// For an nbd:// or nbd+unix:// source served by qemu: the dirty bitmap NAME
    /// (`qemu:dirty-bitmap:NAME`, `qemu-nbd -B NAME`). Only the blocks it marks are read and
    /// compared; the rest is taken to be as the destination holds it, which must be the copy
    /// made when the bitmap was created.
    #[arg(long, value_name = "NAME")]
    pub bitmap: Option<String>,
    /// For iscsi:// endpoints: the initiator name to log in with (default
    /// iqn.2024-01.org.blksync:HOSTNAME), for targets whose ACLs name initiators.
    #[arg(long, value_name = "IQN")]
    pub initiator_name: Option<String>,
    /// For iscsi:// endpoints: a file of CHAP secrets (`user=`, `password=`, and for mutual CHAP
    /// `target_user=`, `target_password=`), read on the host that opens the LUN. Secrets may also
    /// come from `LIBISCSI_CHAP_PASSWORD` and `LIBISCSI_CHAP_TARGET_PASSWORD`; never put them on the
    /// command line, where ps shows them. docs/ISCSI.md
    #[arg(long, value_name = "FILE")]
    pub iscsi_secrets: Option<std::path::PathBuf>,
}

/// How results and progress are shown.
#[derive(Debug, Args)]
pub struct OutputArgs {
    /// How to show progress on stderr: a bar (on a terminal), a line every few seconds (for cron
    /// and logs), or nothing. auto picks bar on a terminal and plain otherwise.
    /// `--progress` alone means auto; a mode is given as `--progress=MODE`, so that the word
    /// after it is never taken for one (`--progress a.img b.img`).
    #[arg(
        long,
        value_enum,
        default_value_t = ProgressMode::Auto,
        value_name = "MODE",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "auto"
    )]
    pub progress: ProgressMode,
    /// Print one JSON summary on stdout at the end.
    #[arg(long)]
    pub json: bool,
    /// Print no progress, warnings or summary on stderr (errors still appear).
    #[arg(short, long, conflicts_with = "verbose")]
    pub quiet: bool,
    /// Also say on stderr what was opened and what it can do, which strategy ran and where,
    /// and how long each phase took.
    #[arg(short, long)]
    pub verbose: bool,
}

/// `blksync sync`.
#[derive(Debug, Args)]
pub struct SyncArgs {
    /// Source file or block device (never written): a local path, [USER@]HOST:PATH or
    /// ssh://[USER@]HOST[:PORT]/PATH.
    #[arg(value_name = "SRC")]
    pub source: OsString,
    /// Destination file, block device or directory, local or remote as SRC.
    #[arg(value_name = "DST")]
    pub dest: OsString,
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
    /// Save the old content of every block this sync overwrites into FILE, a delta that
    /// `blksync apply FILE DST` uses to roll DST back. FILE is local or on DST's host
    /// (HOST:PATH); it is always written where DST is, which holds the old bytes.
    #[arg(long, value_name = "FILE", conflicts_with = "dry_run")]
    pub undo: Option<OsString>,
    /// Create DST as a compressed image (zstd at LEVEL, default 3; docs/COMPRESSED-IMAGE.md),
    /// which later syncs update in place: only changed chunks are rewritten. An existing
    /// compressed DST is recognised by its header and updated without this flag. Written
    /// `--compress=auto|off`, it sets `--wire-compress` instead (its meaning before images).
    #[arg(long, value_name = "LEVEL", num_args = 0..=1, require_equals = true, default_missing_value = "3",
          value_parser = parse_image_compress)]
    pub compress: Option<ImageCompress>,
    /// Compress data sent over ssh: auto (zstd level 1 when it pays, never slowing a fast
    /// link), off, or a zstd level (1-19).
    #[arg(long, value_name = "auto|off|LEVEL", default_value = "auto", value_parser = parse_compress)]
    pub wire_compress: i32,
    /// Sleep this many milliseconds after each data block sent (to spare a busy host or link).
    #[arg(long, value_name = "MS")]
    pub pause: Option<u64>,
    /// For an lvm:// destination that does not exist: create it thin, in this pool of its
    /// volume group (default: a linear LV).
    #[arg(long, value_name = "POOL")]
    pub thin_pool: Option<String>,
    #[command(flatten)]
    pub fs: FsArgs,
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub remote: RemoteArgs,
}

/// Examples under `blksync clone --help`.
const CLONE_EXAMPLES: &str = "Examples:
  blksync clone /dev/sda /dev/sdb            a disk onto a bigger or smaller one
  blksync clone --grow 2 /dev/sda vm.img     partition 2 takes the room (the rest move to the end)
  blksync clone disk.img#2 /dev/sdb#3        one partition onto another
  blksync clone root.ext4 /dev/sdb#1         a filesystem image onto a partition
  blksync clone host:/dev/sda host:/dev/sdb  both disks on one remote host: it runs there
  blksync clone /dev/sda vmhost:/srv/vm.img  p2v onto a remote image of the new size
  blksync clone oldbox:/dev/sda vm.img       a remote disk here (only used blocks cross)";

/// `blksync clone`.
#[derive(Debug, Args)]
pub struct CloneArgs {
    /// The disk, partition (DISK#N, DISK#name=NAME, DISK#partuuid=UUID) or filesystem image
    /// (never written).
    #[arg(value_name = "SRC")]
    pub source: OsString,
    /// The disk or partition to write; it must exist (a file of the new size, a device).
    #[arg(value_name = "DST")]
    pub dest: OsString,
    /// The partition number that grows or shrinks to fill the destination (default: the last
    /// one on the disk, which may be a logical DOS partition). Partitions after it keep their
    /// size and move to the end, logical ones with their EBRs.
    #[arg(long, value_name = "N")]
    pub grow: Option<u32>,
    /// Where a resized filesystem's temporary sparse copy (and, for a remote DST, the staging
    /// image) is built (default: DST's directory when DST is a local file, else $TMPDIR). It
    /// needs room for the used blocks.
    #[arg(long, value_name = "DIR")]
    pub temp_dir: Option<std::path::PathBuf>,
    /// Write to a block device even when it is mounted or in use.
    #[arg(long)]
    pub force: bool,
    /// Plan and prepare everything (the new table, each filesystem's resize on its temporary
    /// copy, every refusal), report what would be done, and write nothing to DST.
    #[arg(short = 'n', long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub remote: RemoteArgs,
}

/// `blksync compare`.
#[derive(Debug, Args)]
pub struct CompareArgs {
    /// First image (local or remote, as for sync).
    #[arg(value_name = "SRC")]
    pub source: OsString,
    /// Second image.
    #[arg(value_name = "DST")]
    pub dest: OsString,
    /// How many differing ranges to list.
    #[arg(long, value_name = "N", default_value_t = 20)]
    pub max_ranges: usize,
    #[command(flatten)]
    pub fs: FsArgs,
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub remote: RemoteArgs,
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

/// `sync --compress[=LEVEL]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageCompress {
    /// Create the destination as a compressed image at this zstd level.
    Image(i32),
    /// `--compress=auto|off`: the wire's compression, as `--wire-compress` sets it.
    Wire(i32),
}

fn parse_image_compress(text: &str) -> Result<ImageCompress, String> {
    if let Ok(wire @ (blksync::compress::AUTO | blksync::compress::OFF)) = parse_compress(text) {
        return Ok(ImageCompress::Wire(wire));
    }
    parse_level(text).map(ImageCompress::Image)
}

/// A compressed image's zstd level.
fn parse_level(text: &str) -> Result<i32, String> {
    match text.parse::<i32>() {
        Ok(l) if (1..=19).contains(&l) || (-7..=-1).contains(&l) => Ok(l),
        _ => Err(format!("{text:?} is not a zstd level from 1 to 19 (or -7 to -1 for the fast levels)")),
    }
}

fn parse_compress(text: &str) -> Result<i32, String> {
    match text {
        "auto" => Ok(blksync::compress::AUTO),
        "off" | "none" | "no" => Ok(blksync::compress::OFF),
        level => match level.parse::<i32>() {
            Ok(l) if (1..=19).contains(&l) => Ok(l),
            _ => Err(format!("{text:?} is not auto, off or a zstd level from 1 to 19")),
        },
    }
}

fn parse_size(text: &str) -> Result<u64, String> {
    blksync::size::parse_size(text).map_err(|e| e.to_string())
}

/// `--bwlimit`: a bare number is KiB/s, as with rsync (`--bwlimit 100` is 100 KiB/s, not 100
/// bytes/s, which would take days); a suffix gives the unit.
fn parse_rate(text: &str) -> Result<u64, String> {
    let t = text.trim();
    if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return parse_size(&format!("{t}K"));
    }
    parse_size(t)
}

#[cfg(test)]
mod tests {
    use super::parse_rate;

    #[test]
    fn a_bare_bwlimit_is_kib_per_second_and_suffixes_keep_their_unit() {
        assert_eq!(parse_rate("100"), Ok(100 << 10));
        assert_eq!(parse_rate("1.5"), Ok(1536));
        assert_eq!(parse_rate("50M"), Ok(50 << 20));
        assert_eq!(parse_rate("100B"), Ok(100));
        assert_eq!(parse_rate("0"), Ok(0));
        assert!(parse_rate("fast").is_err());
    }
}
