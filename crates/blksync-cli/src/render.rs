//! Progress on stderr: an `indicatif` bar on a terminal, a plain line every few seconds in logs
//! and cron mails (indicatif draws nothing off a terminal), or nothing.
//!
//! Both show the same numbers in the same format ([`crate::human`]): the bar and the plain line
//! differ only in layout. The bar's text is a `wide_msg`, which indicatif cuts to the terminal's
//! width, so the line never wraps (it did at 80 columns); the most useful numbers come first.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use blksync::progress::{Observer, Phase, Snapshot};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::args::ProgressMode;
use crate::human::{self, size};

/// How often a plain progress line is printed.
const PLAIN_EVERY: Duration = Duration::from_secs(5);
/// How often the bar's text is refreshed (indicatif limits redraws on its own).
const BAR_EVERY: Duration = Duration::from_millis(100);
/// The bar: the phase, a fixed-width bar, then the numbers, cut to fit the terminal.
const BAR_TEMPLATE: &str = "{prefix:>7} [{bar:16}] {wide_msg}";

/// The last progress reported in this process and the phase's label, for the `done` of a
/// `--json` failure document (see [`last_progress`]). One per process: the binary runs one
/// command.
static LAST: Mutex<Option<(&'static str, Snapshot)>> = Mutex::new(None);

/// The last progress any [`Render`] was given, with the phase's label: what a failed or
/// interrupted run had done (at least) when it stopped.
pub fn last_progress() -> Option<(&'static str, Snapshot)> {
    *LAST.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn record(label: &'static str, snapshot: Snapshot) {
    *LAST.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some((label, snapshot));
}

/// Renders progress and warnings on stderr.
pub struct Render {
    mode: ProgressMode,
    quiet: bool,
    /// `--verbose`: notes and phase times.
    verbose: bool,
    command: &'static str,
    bar: Option<ProgressBar>,
    state: Mutex<State>,
    hint: Hint,
}

/// Flag advice a command adds to a warning: the library's texts name no flags, because
/// commands without them reach the same code.
pub type Hint = fn(&str) -> Option<&'static str>;

struct State {
    phase: Phase,
    total: u64,
    last: Instant,
    phase_started: Instant,
    /// The bytes done at the last report that moved, and when: a remote peer that goes quiet
    /// shows as stalled in plain progress (logs are where nobody watches a bar).
    moved: (u64, Instant),
    /// A phase started and its time was not reported yet (`--verbose`).
    timing: bool,
}

/// What one progress report shows, in numbers.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Shown {
    done: u64,
    total: u64,
    differing: u64,
    written: u64,
    zeroed: u64,
    seconds: f64,
}

impl Shown {
    fn new(s: &Snapshot, total: u64, seconds: f64) -> Shown {
        // Examined, not scanned: written data can be counted before its chunk is (see
        // Snapshot::bytes_examined), and "written" must never read larger than "scanned".
        let done = if total > 0 { s.bytes_examined().min(total) } else { s.bytes_examined() };
        Shown {
            done,
            total,
            differing: s.bytes_differing.min(done),
            written: s.bytes_written.min(done),
            zeroed: s.bytes_zeroed.min(done.saturating_sub(s.bytes_written)),
            seconds,
        }
    }

    fn percent(&self) -> f64 {
        if self.total > 0 { 100.0 * self.done as f64 / self.total as f64 } else { 100.0 }
    }

    fn eta(&self) -> String {
        let rate = if self.seconds > 0.0 { self.done as f64 / self.seconds } else { 0.0 };
        human::eta(self.total.saturating_sub(self.done), rate)
    }

    /// The bar's text, most useful first (the terminal may cut the end).
    fn bar_text(&self) -> String {
        format!(
            "{} / {}  {}  ETA {}  diff {}  wrote {}",
            size(self.done),
            size(self.total),
            human::rate(self.done, self.seconds),
            self.eta(),
            size(self.differing),
            size(self.written + self.zeroed),
        )
    }

    /// A plain progress line.
    fn plain_line(&self, label: &str) -> String {
        format!(
            "blksync: {label} {} / {} ({:.1}%), differing {}, written {}, zeroed {}, {}, ETA {}",
            size(self.done),
            size(self.total),
            self.percent(),
            size(self.differing),
            size(self.written),
            size(self.zeroed),
            human::rate(self.done, self.seconds),
            self.eta(),
        )
    }
}

/// What a phase is called on screen: the command doing it, or "verify" for the re-read after a
/// sync. (A backup increment is made by comparing, but the user ran `backup`.)
fn label(command: &'static str, phase: Phase) -> &'static str {
    match phase {
        Phase::Verify => "verify",
        Phase::Sync | Phase::Compare => command,
    }
}

fn bar_on(target: ProgressDrawTarget) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(0), target);
    bar.set_style(
        ProgressStyle::with_template(BAR_TEMPLATE)
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar
}

impl Render {
    /// A renderer for `command`'s progress as `output` asks.
    pub fn new(output: &crate::args::OutputArgs, command: &'static str) -> Render {
        Render { verbose: output.verbose, ..Render::plain(output.progress, output.quiet, command) }
    }

    /// A renderer for `command`'s progress in `mode`; `quiet` silences everything but errors.
    fn plain(mode: ProgressMode, quiet: bool, command: &'static str) -> Render {
        let mode = match mode {
            _ if quiet => ProgressMode::None,
            ProgressMode::Auto if std::io::IsTerminal::is_terminal(&std::io::stderr()) => ProgressMode::Bar,
            ProgressMode::Auto => ProgressMode::Plain,
            m => m,
        };
        let bar = (mode == ProgressMode::Bar).then(|| bar_on(ProgressDrawTarget::stderr()));
        Render::with_bar(mode, quiet, command, bar)
    }

    fn with_bar(mode: ProgressMode, quiet: bool, command: &'static str, bar: Option<ProgressBar>) -> Render {
        let now = Instant::now();
        Render {
            mode,
            quiet,
            verbose: false,
            command,
            bar,
            state: Mutex::new(State {
                phase: Phase::Sync,
                total: 0,
                last: now,
                phase_started: now,
                moved: (0, now),
                timing: false,
            }),
            hint: |_| None,
        }
    }

    /// The same renderer, adding `hint`'s advice to warnings.
    pub fn with_hint(self, hint: Hint) -> Render {
        Render { hint, ..self }
    }

    /// Removes the bar before the final messages.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        self.phase_took();
    }

    /// `--verbose`: how long the phase that is ending took.
    fn phase_took(&self) {
        let mut state = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if self.verbose && state.timing {
            state.timing = false;
            let took = state.phase_started.elapsed().as_secs_f64();
            let label = label(self.command, state.phase);
            drop(state);
            self.line(&format!("blksync: {label} took {took:.2} s"));
        }
    }

    /// Prints a line on stderr without tearing the bar.
    pub fn line(&self, text: &str) {
        if self.quiet {
            return;
        }
        match &self.bar {
            Some(bar) => bar.suspend(|| crate::console::err(text)),
            None => crate::console::err(text),
        }
    }
}

impl Observer for Render {
    fn phase(&self, phase: Phase, total: u64) {
        self.phase_took();
        let mut state = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        state.timing = true;
        state.phase = phase;
        state.total = total;
        state.phase_started = Instant::now();
        state.moved = (0, state.phase_started);
        record(label(self.command, phase), Snapshot { bytes_total: total, ..Snapshot::default() });
        if let Some(bar) = &self.bar {
            bar.reset();
            bar.set_length(total);
            bar.set_prefix(label(self.command, phase));
            bar.set_message(Shown::new(&Snapshot::default(), total, 0.0).bar_text());
        }
    }

    fn progress(&self, s: &Snapshot) {
        let now = Instant::now();
        let mut state = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        record(label(self.command, state.phase), *s);
        let shown = Shown::new(s, state.total, now.duration_since(state.phase_started).as_secs_f64());
        let activity = s.bytes_examined() + s.bytes_read_source + s.bytes_read_destination;
        if activity != state.moved.0 {
            state.moved = (activity, now);
        }
        match self.mode {
            ProgressMode::Bar => {
                if let Some(bar) = &self.bar {
                    bar.set_position(shown.done);
                    if now.duration_since(state.last) >= BAR_EVERY {
                        state.last = now;
                        bar.set_message(shown.bar_text());
                    }
                }
            }
            ProgressMode::Plain if now.duration_since(state.last) >= PLAIN_EVERY => {
                state.last = now;
                let mut line = shown.plain_line(label(self.command, state.phase));
                let still = now.duration_since(state.moved.1);
                if still >= PLAIN_EVERY {
                    line = format!("{line}, stalled for {}", human::duration(still.as_secs_f64()));
                }
                crate::console::err(&line);
            }
            _ => {}
        }
    }

    fn note(&self, message: &str) {
        if self.verbose {
            self.line(&format!("blksync: {message}"));
        }
    }

    fn warn(&self, message: &str) {
        match (self.hint)(message) {
            Some(hint) => self.line(&format!("blksync: warning: {message} ({hint})")),
            None => self.line(&format!("blksync: warning: {message}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A terminal of a given width that records what is drawn on it.
    #[derive(Debug, Clone)]
    struct Screen {
        width: u16,
        text: Arc<Mutex<String>>,
    }

    impl indicatif::TermLike for Screen {
        fn width(&self) -> u16 {
            self.width
        }
        fn move_cursor_up(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_down(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_right(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_left(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn write_line(&self, s: &str) -> std::io::Result<()> {
            self.write_str(&format!("{s}\n"))
        }
        fn write_str(&self, s: &str) -> std::io::Result<()> {
            self.text.lock().unwrap().push_str(s);
            Ok(())
        }
        fn clear_line(&self) -> std::io::Result<()> {
            self.write_str("\n")
        }
        fn flush(&self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn big_snapshot() -> Snapshot {
        Snapshot {
            bytes_total: 3 << 40,
            bytes_scanned: (1 << 40) + (1 << 39),
            bytes_differing: 700 << 30,
            bytes_written: 600 << 30,
            bytes_zeroed: 100 << 30,
            ..Snapshot::default()
        }
    }

    #[test]
    fn bar_fits_the_terminal_width_instead_of_wrapping() {
        for width in [40u16, 60, 80, 120] {
            let screen = Screen { width, text: Arc::default() };
            let bar = bar_on(ProgressDrawTarget::term_like(Box::new(screen.clone())));
            let render = Render::with_bar(ProgressMode::Bar, false, "restore", Some(bar));
            render.phase(Phase::Sync, 3 << 40);
            std::thread::sleep(BAR_EVERY);
            render.progress(&big_snapshot());
            // Past indicatif's redraw limit, so that this draw happens.
            std::thread::sleep(Duration::from_millis(100));
            render.bar.as_ref().unwrap().tick();
            let text = screen.text.lock().unwrap().clone();
            let lines: Vec<&str> = text.lines().filter(|l| l.contains('[')).collect();
            for line in &lines {
                assert!(line.chars().count() <= usize::from(width), "{} columns > {width}: {line:?}", line.len());
            }
            let last = lines.last().unwrap_or_else(|| panic!("nothing drawn at width {width}: {text:?}"));
            assert!(last.starts_with("restore [========>       ] 1.5 TiB /"), "{last:?}");
        }
    }

    #[test]
    fn bar_and_plain_text_share_one_size_format() {
        let shown = Shown::new(&big_snapshot(), 3 << 40, 100.0);
        assert_eq!(shown.bar_text(), "1.5 TiB / 3.0 TiB  15.4 GiB/s  ETA 1:40  diff 700.0 GiB  wrote 700.0 GiB");
        assert_eq!(
            shown.plain_line("backup"),
            "blksync: backup 1.5 TiB / 3.0 TiB (50.0%), differing 700.0 GiB, written 600.0 GiB, \
             zeroed 100.0 GiB, 15.4 GiB/s, ETA 1:40"
        );
    }

    #[test]
    fn written_never_shows_more_than_scanned() {
        // A chunk counts as scanned when it completes; its data is counted as it is sent.
        let s = Snapshot {
            bytes_total: 100 << 20,
            bytes_scanned: 4 << 20,
            bytes_differing: 12 << 20,
            bytes_written: 12 << 20,
            ..Snapshot::default()
        };
        let shown = Shown::new(&s, 100 << 20, 1.0);
        assert_eq!(shown.done, 12 << 20);
        assert!(shown.written <= shown.done && shown.differing <= shown.done);
        assert!(shown.plain_line("sync").starts_with("blksync: sync 12.0 MiB / 100.0 MiB (12.0%)"));
    }

    #[test]
    fn backup_is_labelled_backup_not_compare() {
        assert_eq!(label("backup", Phase::Compare), "backup");
        assert_eq!(label("backup", Phase::Sync), "backup");
        assert_eq!(label("sync", Phase::Verify), "verify");
        assert_eq!(label("diff", Phase::Compare), "diff");
    }
}
