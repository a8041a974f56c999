//! The library's hints in this front end's words: the flag that gets past an error, named only
//! when the command at hand has it (`restore` reaches the size errors of `sync`, but has none
//! of its size flags).

use blksync::Hint;
use clap::CommandFactory;

use crate::args::Cli;

/// `e` with the advice its hint stands for, when `command` has the flag.
pub fn add(command: &str, e: anyhow::Error) -> anyhow::Error {
    let Some(text) = e.downcast_ref::<blksync::Error>().and_then(blksync::Error::hint).and_then(|h| text(command, h))
    else {
        return e;
    };
    match e.downcast::<blksync::Error>() {
        Ok(inner) => {
            let message = format!("{inner} ({text})");
            inner.reworded(message).into()
        }
        Err(e) => e,
    }
}

/// The advice for `hint` in `command`, naming its flag.
pub fn text(command: &str, hint: Hint) -> Option<&'static str> {
    let (flag, text) = match hint {
        Hint::Force => ("force", "--force overrides"),
        Hint::LargerSnapshot => ("snapshot-size", "a larger --snapshot-size avoids it"),
        Hint::SmallerSnapshot => ("snapshot-size", "a smaller --snapshot-size may fit"),
        Hint::LongerTimeout => ("timeout", "--timeout sets how long to wait"),
        Hint::CommonSize => ("common-size", "--common-size syncs only the first min(SRC, DST) bytes"),
        _ => return None,
    };
    let cli = Cli::command();
    let sub = cli.find_subcommand(command)?;
    sub.get_arguments().any(|a| a.get_long() == Some(flag)).then_some(text)
}
