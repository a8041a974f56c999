//! The `blksync` binary: parse arguments, run one library operation, map the result to an exit
//! code. Everything else lives in the `blksync` library crate.

// Output goes through `console`, which never panics on a closed pipe or a full disk.
#![warn(clippy::print_stdout, clippy::print_stderr)]

mod args;
mod commands;
mod console;
mod hint;
mod human;
mod json;
mod render;

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use clap::Parser;

use crate::args::{Cli, Command};
use crate::commands::Outcome;

fn main() -> ExitCode {
    // Signals are caught first of all, so that a Ctrl-C never finds a half-started run without
    // its handlers. The agent is stopped by its client closing the connection, not by signals.
    let cancel = Arc::new(AtomicBool::new(false));
    let agent = std::env::args_os().nth(1).is_some_and(|a| a == "agent");
    if !agent && let Err(e) = install_signal_handlers(&cancel) {
        console::err(&format!("blksync: error: cannot install signal handlers: {e}"));
        return ExitCode::from(2);
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(&e),
    };
    if let Command::Agent(args) = &cli.command {
        return ExitCode::from(commands::agent(args));
    }
    let (name, json) = (cli.command.name(), cli.command.json());
    let is_compare = matches!(cli.command, Command::Compare(_));
    let result = match &cli.command {
        Command::Sync(args) => commands::sync(args, &cancel),
        Command::Clone(args) => commands::clone(args, &cancel),
        Command::Compare(args) => commands::compare(args, &cancel),
        Command::Diff(args) => commands::diff(args, &cancel),
        Command::Apply(args) => commands::apply(args, &cancel),
        Command::Info(args) => commands::info(args, &cancel),
        Command::Merge(args) => commands::merge(args, &cancel),
        Command::Backup(args) => commands::backup(args, &cancel),
        Command::List(args) => commands::list(args, &cancel),
        Command::Restore(args) => commands::restore(args, &cancel),
        Command::Prune(args) => commands::prune(args, &cancel),
        Command::Serve(args) => commands::serve(args, &cancel),
        Command::ListTargets(args) => commands::list_targets(args),
        Command::Completions(args) => commands::completions(args),
        Command::Man => commands::man(),
        Command::Agent(_) => unreachable!("handled above"),
    };
    match result {
        Ok(Outcome::Success) => ExitCode::SUCCESS,
        Ok(Outcome::Different) => ExitCode::from(1),
        Err(e) => {
            let e = hint::add(name, e);
            // The whole chain on one line: "reading /dev/sdb at byte offset 4096: Input/output error".
            console::err(&format!("blksync: error: {e:#}"));
            let code = e.downcast_ref::<blksync::Error>().map_or(2, |e| e.kind().exit_code());
            // compare follows cmp: 2 for any error.
            let code = if is_compare { 2 } else { code };
            if json {
                json::print_failure(name, code, json::failure(&e, render::last_progress()));
            }
            ExitCode::from(code)
        }
    }
}

/// A command line that clap rejects: its message on stderr as clap prints it and, when the
/// arguments ask for `--json`, the error document on stdout (`command` is `null` when there is
/// no known subcommand). `--help` and `--version` print as usual.
fn usage_error(e: &clap::Error) -> ExitCode {
    if !e.use_stderr() {
        let _ = e.print();
        return ExitCode::SUCCESS;
    }
    let _ = e.print();
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    if args.iter().take_while(|a| *a != "--").any(|a| a == "--json") {
        let command = args.first().and_then(|a| a.to_str()).filter(|a| {
            <Cli as clap::CommandFactory>::command().find_subcommand(a).is_some_and(|c| c.get_name() != "agent")
        });
        let text = e.render().to_string();
        let first = text.lines().next().unwrap_or_default();
        let message = first.strip_prefix("error: ").unwrap_or(first);
        json::print_usage_failure(command, message);
    }
    ExitCode::from(2)
}

/// How long a run may take to stop after the first signal before the watchdog ends it.
const GRACE: Duration = Duration::from_secs(10);

/// The first SIGINT/SIGTERM asks the engine to stop at the next chunk and flush; a second one
/// exits at once (the destination then holds whatever reached it, which is still correct data).
///
/// A run blocked where it cannot look at the flag (writing to a pipe nobody reads, waiting for a
/// peer that went silent) would ignore the first signal. So a watchdog thread waits for it, then
/// for [`GRACE`], and then acts as a second signal would, unless a thread of ours is in disk I/O
/// (uninterruptible sleep, as in the fsync of an interrupted sync or the commit of an undo
/// log): that is progress, and cutting it would cost what the graceful stop is for.
fn install_signal_handlers(cancel: &Arc<AtomicBool>) -> std::io::Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    for signal in [SIGINT, SIGTERM] {
        signal_hook::flag::register_conditional_shutdown(signal, 130, Arc::clone(cancel))?;
        signal_hook::flag::register(signal, Arc::clone(cancel))?;
    }
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])?;
    std::thread::spawn(move || {
        if signals.forever().next().is_none() {
            return;
        }
        std::thread::sleep(GRACE);
        while in_disk_io() {
            std::thread::sleep(Duration::from_millis(200));
        }
        // The message goes from a thread of its own: stderr may be what we are blocked on.
        std::thread::spawn(|| {
            console::err(&format!("blksync: error: interrupted, and still not stopped {GRACE:?} later; exiting now"));
        });
        std::thread::sleep(Duration::from_millis(100));
        signal_hook::low_level::exit(130);
    });
    Ok(())
}

/// True when a thread of this process is in uninterruptible sleep (state `D` in
/// `/proc/self/task/*/stat`), which is where the kernel waits for the disk.
fn in_disk_io() -> bool {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return false };
    tasks.flatten().any(|task| {
        std::fs::read_to_string(task.path().join("stat")).is_ok_and(|stat| {
            // "TID (COMM) STATE ...": COMM may hold spaces and parentheses, the last ')' ends it.
            stat.rfind(')').and_then(|i| stat[i + 1..].split_whitespace().next()) == Some("D")
        })
    })
}
