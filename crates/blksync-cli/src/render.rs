//! Progress on stderr: an `indicatif` bar on a terminal, a plain line every few seconds in logs
//! and cron mails (indicatif draws nothing off a terminal), or nothing.

use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use blksync::progress::{Observer, Phase, Snapshot};
use blksync::size::{format_rate, format_size};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::args::ProgressMode;

/// How often a plain progress line is printed.
const PLAIN_EVERY: Duration = Duration::from_secs(5);
/// How often the bar's text is refreshed (indicatif limits redraws on its own).
const BAR_EVERY: Duration = Duration::from_millis(100);

/// Renders progress and warnings on stderr.
pub struct Render {
    mode: ProgressMode,
    quiet: bool,
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
}

impl Render {
    /// A renderer for `mode`; `quiet` silences everything but errors.
    pub fn new(mode: ProgressMode, quiet: bool) -> Render {
        let mode = match mode {
            _ if quiet => ProgressMode::None,
            ProgressMode::Auto if std::io::stderr().is_terminal() => ProgressMode::Bar,
            ProgressMode::Auto => ProgressMode::Plain,
            m => m,
        };
        let bar = (mode == ProgressMode::Bar).then(|| {
            let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template(
                    "{prefix:>7} [{bar:30}] {bytes}/{total_bytes} {msg} {binary_bytes_per_sec} ETA {eta}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar
        });
        let now = Instant::now();
        Render {
            mode,
            quiet,
            bar,
            state: Mutex::new(State { phase: Phase::Sync, total: 0, last: now, phase_started: now }),
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

fn phase_name(phase: Phase) -> &'static str {
    match phase {
        Phase::Sync => "sync",
        Phase::Compare => "compare",
        Phase::Verify => "verify",
    }
}

impl Observer for Render {
    fn phase(&self, phase: Phase, total: u64) {
        let mut state = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        state.phase = phase;
        state.total = total;
        state.phase_started = Instant::now();
        if let Some(bar) = &self.bar {
            bar.reset();
            bar.set_length(total);
            bar.set_prefix(phase_name(phase));
        }
    }

    fn progress(&self, s: &Snapshot) {
        let now = Instant::now();
        let mut state = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match self.mode {
            ProgressMode::Bar => {
                if let Some(bar) = &self.bar {
                    bar.set_position(s.bytes_scanned);
                    if now.duration_since(state.last) >= BAR_EVERY {
                        state.last = now;
                        bar.set_message(format!(
                            "diff {} wrote {}",
                            format_size(s.bytes_differing),
                            format_size(s.bytes_written + s.bytes_zeroed)
                        ));
                    }
                }
            }
            ProgressMode::Plain if now.duration_since(state.last) >= PLAIN_EVERY => {
                state.last = now;
                let elapsed = now.duration_since(state.phase_started).as_secs_f64();
                let rate = if elapsed > 0.0 { s.bytes_scanned as f64 / elapsed } else { 0.0 };
                let eta = if rate > 0.0 {
                    format!("{:.0}s", state.total.saturating_sub(s.bytes_scanned) as f64 / rate)
                } else {
                    "?".into()
                };
                let pct = if state.total > 0 { 100.0 * s.bytes_scanned as f64 / state.total as f64 } else { 100.0 };
                let mut err = std::io::stderr().lock();
                let _ = writeln!(
                    err,
                    "blksync: {} {} / {} ({pct:.1}%), differing {}, written {}, zeroed {}, {}, ETA {eta}",
                    phase_name(state.phase),
                    format_size(s.bytes_scanned),
                    format_size(state.total),
                    format_size(s.bytes_differing),
                    format_size(s.bytes_written),
                    format_size(s.bytes_zeroed),
                    format_rate(s.bytes_scanned, elapsed),
                );
            }
            _ => {}
        }
    }

    fn warn(&self, message: &str) {
        match (self.hint)(message) {
            Some(hint) => self.line(&format!("blksync: warning: {message} ({hint})")),
            None => self.line(&format!("blksync: warning: {message}")),
        }
    }
}
