//! `--json` (docs/JSON.md): every command prints one object, with `command`, `schema` and
//! `exit_code`, on success, failure and interrupt, with the same fields locally and remotely.

mod support;

use std::collections::BTreeSet;
use std::process::{Output, Stdio};

use serde_json::Value;
use support::*;
use tempfile::TempDir;

const MIB: usize = 1 << 20;

/// The one document a run printed: stdout must be exactly one line holding one JSON object.
#[track_caller]
fn document(args: &[&str], out: &Output) -> Value {
    let text = out.stdout_text();
    assert!(
        text.ends_with('\n') && text.trim_end().lines().count() == 1,
        "blksync {args:?}: stdout is not one line: {text:?}\nstderr: {}",
        out.stderr_text()
    );
    let v = out.json();
    assert!(v.is_object(), "blksync {args:?}: not an object: {v}");
    v
}

/// Runs `blksync ARGS... --json` expecting `code`, and checks the envelope.
#[track_caller]
fn json_run(args: &[&str], code: i32) -> Value {
    let mut all = args.to_vec();
    all.push("--json");
    let out = run(&all);
    assert_eq!(out.code(), code, "blksync {all:?}:\n{}", out.stderr_text());
    let v = document(&all, &out);
    assert_envelope(&v, args[0], code);
    v
}

#[track_caller]
fn assert_envelope(v: &Value, command: &str, code: i32) {
    assert_eq!(v["command"], command, "{v}");
    assert_eq!(v["schema"], 1, "{v}");
    assert_eq!(v["exit_code"], code, "{v}");
    if code > 1 {
        assert!(v["error"]["kind"].is_string() && v["error"]["message"].is_string(), "{v}");
        assert!(v.get("done").is_some(), "{v}");
    } else {
        assert!(v.get("error").is_none(), "{v}");
    }
}

/// Every field name of a document, nested ones as `header.id` and `points[].number`.
fn fields(v: &Value) -> BTreeSet<String> {
    fn walk(v: &Value, prefix: &str, out: &mut BTreeSet<String>) {
        match v {
            Value::Object(map) => {
                for (k, v) in map {
                    let name = format!("{prefix}{k}");
                    walk(v, &format!("{name}."), out);
                    out.insert(name);
                }
            }
            Value::Array(items) => {
                for item in items {
                    walk(item, &format!("{}[].", prefix.trim_end_matches('.')), out);
                }
            }
            _ => {}
        }
    }
    let mut out = BTreeSet::new();
    walk(v, "", &mut out);
    out
}

fn tmp() -> TempDir {
    tempfile::Builder::new().prefix("blksync-json").tempdir().unwrap()
}

#[test]
fn every_command_prints_one_object_with_command_and_schema() {
    let d = tmp();
    let p = |name: &str| arg(d.path(), name);
    let mut data = random_bytes(2 * MIB, 1);
    write_file(p("v0").as_ref(), &data);
    data[5000..9000].fill(7);
    write_file(p("v1").as_ref(), &data);
    data[MIB..MIB + 4096].fill(0);
    write_file(p("v2").as_ref(), &data);
    let j = json_run(&["sync", "-q", &p("v0"), &p("copy")], 0);
    assert_eq!(j["bytes_written"], 2 * MIB as u64, "the summary's fields stay at the top: {j}");
    assert_eq!(j["undo_log"], Value::Null);
    let j = json_run(&["compare", &p("v0"), &p("copy")], 0);
    assert_eq!(j["identical"], true);
    let j = json_run(&["compare", &p("v0"), &p("v1")], 1);
    assert_eq!(j["identical"], false);
    json_run(&["diff", "-q", &p("v1"), &p("v0"), "-o", &p("d1")], 0);
    json_run(&["diff", "-q", &p("v2"), &p("v1"), "-o", &p("d2")], 0);
    let j = json_run(&["apply", "-q", &p("d1"), &p("copy")], 0);
    assert_eq!(j["deltas"].as_array().unwrap().len(), 1);
    let j = json_run(&["merge", "-q", &p("d1"), &p("d2"), "-o", &p("m")], 0);
    assert!(j["records"].as_u64().unwrap() > 0, "{j}");
    let j = json_run(&["info", &p("m")], 0);
    assert_eq!(j["header"]["size_after"], 2 * MIB as u64);
    for (i, v) in ["v0", "v1", "v2"].iter().enumerate() {
        let j = json_run(&["backup", "-q", &p(v), &p("bk")], 0);
        assert_eq!(j["number"], i, "{j}");
    }
    let j = json_run(&["list", &p("bk")], 0);
    assert_eq!(j["points"].as_array().unwrap().len(), 3, "{j}");
    assert_eq!(j["points"][2]["number"], 2);
    let j = json_run(&["restore", "-q", "--at", "1", &p("bk"), &p("restored")], 0);
    assert_eq!(j["destination"], p("restored"));
    assert_same(p("restored").as_ref(), p("v1").as_ref());
    let j = json_run(&["prune", "-q", "--keep", "1", &p("bk")], 0);
    assert_eq!(j["folded"], 1);
}

#[test]
fn a_failing_command_with_json_prints_the_error_object_and_its_exit_code() {
    let d = tmp();
    let p = |name: &str| arg(d.path(), name);
    write_file(p("a").as_ref(), &random_bytes(MIB, 2));
    write_file(p("b").as_ref(), &random_bytes(MIB, 3));
    write_file(p("c").as_ref(), &random_bytes(MIB, 7));
    write_file(p("not-a-delta").as_ref(), b"hello, this is not a delta file at all");
    ok(&["backup", "-q", &p("a"), &p("bk")]);
    ok(&["diff", "-q", &p("b"), &p("a"), "-o", &p("d")]);
    let cases: [(&[&str], i32, &str); 8] = [
        (&["sync", &p("missing"), &p("x")], 3, "not_found"),
        (&["sync", "--no-resize", &p("a"), &p("nodir/x")], 3, "not_found"),
        // compare exits 2 for every error, as cmp does; the kind still says what happened.
        (&["compare", &p("a"), &p("missing")], 2, "not_found"),
        (&["info", &p("not-a-delta")], 9, "corrupt"),
        (&["apply", &p("d"), &p("c")], 10, "wrong_target"),
        (&["restore", "--at", "7", &p("bk"), &p("r")], 2, "usage"),
        (&["list", &p("no-chain")], 3, "not_found"),
        // Rejected by the argument parser, which knows the subcommand.
        (&["sync", "--no-such-option", &p("a"), &p("b")], 2, "usage"),
    ];
    for (args, code, kind) in cases {
        let j = json_run(args, code);
        assert_eq!(j["error"]["kind"], kind, "{args:?}: {j}");
        let mut all = args.to_vec();
        all.push("--json");
        let out = run(&all);
        let message = j["error"]["message"].as_str().unwrap();
        assert!(out.stderr_text().contains(message), "{args:?}: stderr has the same message: {}", out.stderr_text());
    }
    assert_eq!(json_run(&["info", &p("not-a-delta")], 9)["done"], Value::Null);
    // Without --json, stdout stays empty on failure.
    assert_eq!(run(&["info", &p("not-a-delta")]).stdout_text(), "");
}

#[test]
fn an_interrupted_sync_prints_the_error_object_with_what_was_done() {
    let d = tmp();
    let (src, dst) = (arg(d.path(), "src"), arg(d.path(), "dst"));
    write_file(src.as_ref(), &random_bytes(32 * MIB, 4));
    let args = ["sync", "--json", "--bwlimit", "8M", "--progress=none", &src, &dst];
    let mut child = blksync().args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    wait_until(&mut child, "4 MiB written", || {
        std::fs::metadata(&dst).is_ok() && allocated(dst.as_ref()) >= 4 * MIB as u64
    });
    std::process::Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.code(), 130, "{}", out.stderr_text());
    let j = document(&args, &out);
    assert_envelope(&j, "sync", 130);
    assert_eq!(j["error"]["kind"], "interrupted");
    let done = &j["done"];
    assert_eq!(done["phase"], "sync", "{j}");
    assert_eq!(done["bytes_total"], 32 * MIB as u64, "{j}");
    let scanned = done["bytes_scanned"].as_u64().unwrap();
    assert!(scanned > 0 && scanned < 32 * MIB as u64, "{j}");
    // What the document says was done is in the destination.
    let copied = read(dst.as_ref());
    assert!(copied.len() as u64 >= scanned && read(src.as_ref())[..scanned as usize] == copied[..scanned as usize]);
}

#[test]
fn restore_to_stdout_refuses_json_and_writes_nothing_there() {
    let d = tmp();
    let (src, bk) = (arg(d.path(), "src"), arg(d.path(), "bk"));
    write_file(src.as_ref(), &random_bytes(MIB, 5));
    ok(&["backup", "-q", &src, &bk]);
    let out = run(&["restore", "--json", &bk, "-"]);
    assert_eq!(out.code(), 2, "{}", out.stderr_text());
    assert!(out.stdout.is_empty(), "no document inside the image stream: {:?}", out.stdout_text());
    assert!(out.stderr_text().contains("--json"), "{}", out.stderr_text());
}

#[test]
fn a_command_line_rejected_before_its_subcommand_has_a_null_command() {
    let out = run(&["--json"]);
    assert_eq!(out.code(), 2);
    let j = document(&["--json"], &out);
    assert_eq!(j["command"], Value::Null);
    assert_eq!(j["schema"], 1);
    assert_eq!(j["error"]["kind"], "usage");
    // --help stays help.
    let out = run(&["sync", "--help", "--json"]);
    assert_eq!(out.code(), 0);
    assert!(out.stdout_text().contains("Usage:"));
}

/// A local and a remote run of each command: push, pull and on-host where the command has them.
struct Remote(RemoteDir);

impl std::ops::Deref for Remote {
    type Target = RemoteDir;
    fn deref(&self) -> &RemoteDir {
        &self.0
    }
}

impl Remote {
    fn new() -> Option<Remote> {
        RemoteDir::new("blksync-json-remote").map(Remote)
    }
    /// `blksync COMMAND -e RSH ARGS... --json`, expecting `code`.
    #[track_caller]
    fn json(&self, args: &[&str], code: i32) -> Value {
        let mut all = vec![args[0], "-e", &self.rsh];
        all.extend_from_slice(&args[1..]);
        all.push("--json");
        let out = run(&all);
        assert_eq!(out.code(), code, "blksync {all:?}:\n{}", out.stderr_text());
        let v = document(&all, &out);
        assert_envelope(&v, args[0], code);
        v
    }
}

#[track_caller]
fn assert_same_fields(what: &str, local: &Value, remote: &Value) {
    let (l, r) = (fields(local), fields(remote));
    assert_eq!(
        l,
        r,
        "{what}: only local: {:?}, only remote: {:?}",
        l.difference(&r).collect::<Vec<_>>(),
        r.difference(&l).collect::<Vec<_>>()
    );
}

#[test]
fn local_and_remote_runs_of_a_command_print_the_same_fields() {
    let Some(env) = Remote::new() else { return };
    let (p, r) = (|n: &str| env.path(n), |n: &str| env.remote(n));
    let mut data = random_bytes(3 * MIB, 6);
    write_file(p("v0").as_ref(), &data);
    data[70_000..80_000].fill(3);
    write_file(p("v1").as_ref(), &data);
    data[2 * MIB..2 * MIB + 8192].fill(0);
    write_file(p("v2").as_ref(), &data);
    let q = "-q";

    let local = env.json(&["sync", q, &p("v0"), &p("s-local")], 0);
    for (what, src, dst) in
        [("push", p("v0"), r("s-push")), ("pull", r("v0"), p("s-pull")), ("on-host", r("v0"), r("s-there"))]
    {
        assert_same_fields(&format!("sync {what}"), &local, &env.json(&["sync", q, &src, &dst], 0));
    }
    let local = env.json(&["compare", &p("v0"), &p("v1")], 1);
    assert_same_fields("compare", &local, &env.json(&["compare", &r("v0"), &p("v1")], 1));
    assert_same_fields("compare on-host", &local, &env.json(&["compare", &r("v0"), &r("v1")], 1));

    let local = env.json(&["diff", q, &p("v1"), &p("v0"), "-o", &p("d1")], 0);
    assert_same_fields("diff on-host", &local, &env.json(&["diff", q, &r("v1"), &r("v0"), "-o", &r("d1-there")], 0));
    assert_same_fields("diff across", &local, &env.json(&["diff", q, &r("v1"), &p("v0"), "-o", &p("d1-pulled")], 0));
    env.json(&["diff", q, &p("v2"), &p("v1"), "-o", &p("d2")], 0);

    ok(&["sync", q, &p("v0"), &p("t-local")]);
    ok(&["sync", q, &p("v0"), &p("t-remote")]);
    let local = env.json(&["apply", q, &p("d1"), &p("t-local")], 0);
    assert_same_fields("apply", &local, &env.json(&["apply", q, &p("d1"), &r("t-remote")], 0));

    let local = env.json(&["merge", q, &p("d1"), &p("d2"), "-o", &p("m-local")], 0);
    assert_same_fields("merge", &local, &env.json(&["merge", q, &r("d1"), &r("d2"), "-o", &p("m-remote")], 0));
    let local = env.json(&["info", &p("m-local")], 0);
    assert_same_fields("info", &local, &env.json(&["info", &r("m-local")], 0));

    let mut backups = Vec::new();
    // Each chain gets a base, then an increment, whose document is compared.
    for (chain, remote_source, dest) in [
        ("local", false, p("bk-local")),
        ("push", false, r("bk-push")),
        ("pull", true, p("bk-pull")),
        ("on-host", true, r("bk-there")),
    ] {
        let source = |name: &str| if remote_source { r(name) } else { p(name) };
        env.json(&["backup", q, &source("v0"), &dest], 0);
        backups.push((chain, env.json(&["backup", q, &source("v1"), &dest], 0)));
    }
    let (_, local) = &backups[0];
    for (chain, remote) in &backups[1..] {
        assert_same_fields(&format!("backup {chain}"), local, remote);
    }

    let local = env.json(&["list", &p("bk-local")], 0);
    assert_same_fields("list", &local, &env.json(&["list", &r("bk-push")], 0));
    let local = env.json(&["restore", q, "--at", "0", &p("bk-local"), &p("r-local")], 0);
    assert_same_fields("restore pull", &local, &env.json(&["restore", q, "--at", "0", &r("bk-push"), &p("r-pull")], 0));
    assert_same_fields(
        "restore on-host",
        &local,
        &env.json(&["restore", q, "--at", "0", &r("bk-push"), &r("r-there")], 0),
    );
    let local = env.json(&["prune", q, "--keep", "0", &p("bk-local")], 0);
    assert_same_fields("prune", &local, &env.json(&["prune", q, "--keep", "0", &r("bk-push")], 0));

    // Failures too: the remote error has the local one's kind, exit code and fields.
    let local = env.json(&["info", &p("v0")], 9);
    let remote = env.json(&["info", &r("v0")], 9);
    assert_same_fields("info of a non-delta", &local, &remote);
    assert_eq!(local["error"]["kind"], remote["error"]["kind"]);
    let local = env.json(&["sync", q, "--no-resize", &p("v0"), &p("nodir/x")], 3);
    assert_same_fields("a failed sync", &local, &env.json(&["sync", q, "--no-resize", &p("v0"), &r("nodir/x")], 3));
}

#[test]
fn an_interrupted_push_prints_what_was_done_as_a_local_sync_does() {
    let Some(env) = Remote::new() else { return };
    write_file(env.path("src").as_ref(), &random_bytes(32 * MIB, 8));
    let interrupted = |dst: &str| {
        let args = ["sync", "-e", &env.rsh, "--json", "--bwlimit", "8M", "--progress=none", &env.path("src"), dst];
        let mut child = blksync().args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        let file = dst.rsplit_once(':').map_or(dst, |(_, path)| path).to_string();
        wait_until(&mut child, "4 MiB written", || {
            std::fs::metadata(&file).is_ok() && allocated(file.as_ref()) >= 4 * MIB as u64
        });
        std::process::Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.code(), 130, "{dst}: {}", out.stderr_text());
        let j = document(&args, &out);
        assert_envelope(&j, "sync", 130);
        assert_eq!(j["error"]["kind"], "interrupted", "{j}");
        assert!(j["done"]["bytes_scanned"].as_u64().unwrap() > 0, "{dst}: {j}");
        j
    };
    let local = interrupted(&env.path("local-copy"));
    let pushed = interrupted(&env.remote("pushed-copy"));
    assert_same_fields("an interrupted sync", &local, &pushed);
}
