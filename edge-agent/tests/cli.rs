#![allow(clippy::unwrap_used)]
//! What a user reads: help texts, summaries, listings, snapshot ids, progress and the
//! errors of common mistakes. The texts are pinned in `tests/snapshots/`, so that a
//! change to them is a conscious one: after an intended change run
//! `INSTA_UPDATE=always cargo test --test cli` and review the diff of the `.snap` files.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::*;

/// Stand-ins for what differs between runs: paths, ports, ids, times, durations.
fn settings(tmp: &Path) -> insta::Settings {
    let mut s = insta::Settings::clone_current();
    s.set_prepend_module_to_snapshot(false);
    s.add_filter(&escape(&tmp.display().to_string()), "[TMP]");
    s.add_filter(r"http://127\.0\.0\.1:\d+", "[ENDPOINT]");
    s.add_filter(r"\b[0-9a-f]{32}\b", "[ID]");
    s.add_filter(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", "[TIME]");
    s.add_filter(r"in \d+\.\ds", "in [SECS]");
    // The number of ancestor directories depends on where the temporary directory is.
    s.add_filter(r"\d+ dirs?\b", "[N] dirs");
    // Chunk ids are keyed per agent, so blob trailers compress differently each run.
    s.add_filter(r"[\d.]+ (B|KiB|MiB) uploaded", "[N] B uploaded");
    s.add_filter(r"metadata [\d.]+ (B|KiB|MiB)", "metadata [N] B");
    s
}

fn escape(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            let special = "\\.+*?()|[]{}^$".contains(c);
            special.then_some('\\').into_iter().chain([c])
        })
        .collect()
}

fn shown(args: &[&str]) -> String {
    let args: Vec<&str> = args
        .iter()
        .map(|a| if a.is_empty() { "\"\"" } else { a })
        .collect();
    format!("$ vaultik {}", args.join(" "))
}

/// A command and everything it printed.
fn transcript(args: &[&str], env: &[(&str, &str)]) -> String {
    let out = vaultik(args, env);
    format!(
        "{}\n[exit {}]\n{}{}",
        shown(args),
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout),
        stderr(&out)
    )
}

/// A common mistake: exit 1, nothing on stdout, one line on stderr that names it.
fn mistake(args: &[&str], env: &[(&str, &str)]) -> String {
    let out = vaultik(args, env);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{}: {err}", shown(args));
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");
    assert!(err.starts_with("vaultik: "), "{err}");
    format!("{}\n{err}", shown(args))
}

fn without<'a>(env: &[(&'a str, &'a str)], var: &str) -> Vec<(&'a str, &'a str)> {
    env.iter().filter(|(k, _)| *k != var).copied().collect()
}

#[test]
fn help_texts() {
    let t = tempfile::tempdir().unwrap();
    let _s = settings(t.path()).bind_to_scope();
    for sub in [
        "",
        "backup",
        "restore",
        "fetch",
        "ls",
        "snapshots",
        "prune",
        "verify",
        "keygen",
        "enroll",
        "agent",
    ] {
        let args: Vec<&str> = [sub, "--help"]
            .into_iter()
            .filter(|a| !a.is_empty())
            .collect();
        let out = vaultik(&args, &[]);
        assert!(out.status.success(), "{}", stderr(&out));
        let name = if sub.is_empty() { "help" } else { sub };
        insta::assert_snapshot!(format!("help_{name}"), String::from_utf8_lossy(&out.stdout));
    }
}

#[test]
fn common_mistakes_get_one_line_errors() {
    let s3 = S3Server::start();
    let t = tempfile::tempdir().unwrap();
    let _s = settings(t.path()).bind_to_scope();
    let src = t.path().join("src");
    write_file(&src.join("f"), b"x");
    let key = keygen(t.path());
    let cfg = s3_config(t.path(), &s3.endpoint, "host1", &[&src], &key, "");
    backup_ok(&cfg);
    let env = s3_env(&s3.endpoint, &key);
    let tgt = t.path().join("r");
    let tgt = tgt.to_str().unwrap();
    let other = keygen(&t.path().join("other").tap_mkdir());
    let mut wrong_key = without(&env, "VAULTIK_PRIVATE_KEY");
    wrong_key.push(("VAULTIK_PRIVATE_KEY", other.secret.as_str()));
    let no_key = without(&env, "VAULTIK_PRIVATE_KEY");
    let mut garbage_key = no_key.clone();
    garbage_key.push(("VAULTIK_PRIVATE_KEY", "not a key"));
    let mut wrong_secret = without(&env, "AWS_SECRET_ACCESS_KEY");
    wrong_secret.push(("AWS_SECRET_ACCESS_KEY", "not-the-secret"));
    let dead = format!("http://127.0.0.1:{}", free_port());
    let mut unreachable = without(&env, "AWS_ENDPOINT_URL");
    unreachable.push(("AWS_ENDPOINT_URL", dead.as_str()));
    let a_file = t.path().join("a-file");
    write_file(&a_file, b"");
    let bad = |name: &str, text: String| {
        let p = t.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    };
    let typo = bad(
        "typo.yaml",
        format!(
            "source_dirs: [/tmp]\nage_recipient: {}\ndestination: file:///tmp/x\nchunk_sise: 1MB\n",
            key.public
        ),
    );
    let recipient = bad(
        "recipient.yaml",
        "source_dirs: [/tmp]\nexclude: []\nage_recipients:\n  - age1nope\ndestination: file:///tmp/x\n".into(),
    );
    let indent = bad(
        "indent.yaml",
        "source_dirs:\n  - /tmp\n age_recipient: x\n".into(),
    );
    let ftp = bad(
        "ftp.yaml",
        format!(
            "source_dirs: [/tmp]\nage_recipient: {}\ndestination: ftp://host/x\n",
            key.public
        ),
    );

    let cases = [
        mistake(&["restore", BUCKET, "host1", "latest", tgt], &wrong_key),
        mistake(&["snapshots", BUCKET, "host1"], &no_key),
        mistake(&["snapshots", BUCKET, "host1"], &garbage_key),
        mistake(&["snapshots", BUCKET, "host1"], &wrong_secret),
        mistake(&["snapshots", "no-such-bucket", "host1"], &env),
        mistake(
            &["snapshots", BUCKET, "host1", "--retry-for", "0s"],
            &unreachable,
        ),
        mistake(&["restore", BUCKET, "host1", "deadbeef", tgt], &env),
        mistake(&["ls", BUCKET, "host1", "last"], &env),
        mistake(
            &["fetch", BUCKET, "host1", "latest", "/etc/nope", tgt],
            &env,
        ),
        mistake(&["ls", BUCKET, "host1", "latest", "/etc/nope"], &env),
        mistake(
            &[
                "restore",
                BUCKET,
                "host1",
                "latest",
                a_file.to_str().unwrap(),
            ],
            &env,
        ),
        mistake(&["backup", &typo], &[]),
        mistake(&["backup", &recipient], &[]),
        mistake(&["backup", &indent], &[]),
        mistake(&["backup", &ftp], &[]),
        mistake(&["backup", "/no/such/config.yaml"], &[]),
    ];
    insta::assert_snapshot!("mistakes", cases.join("\n"));
    // A usage error is clap's: exit 2, with the usage line.
    insta::assert_snapshot!(
        "usage_error",
        transcript(&["prune", BUCKET, "host1", "--keep-last", "many"], &env)
    );
}

#[test]
fn summaries_and_listings() {
    let s3 = S3Server::start();
    let t = tempfile::tempdir().unwrap();
    let mut s = settings(t.path());
    // Owners differ between machines.
    s.add_filter(r"(?m)^([-dlh?][rwx-]{9})\s+\d+\s+\d+", "$1 [UID] [GID]");
    s.add_filter(r#""uid":\d+,"gid":\d+"#, r#""uid":[UID],"gid":[GID]"#);
    let _s = s.bind_to_scope();
    let src = t.path().join("src");
    write_file(&src.join("docs/a.txt"), b"hello");
    write_file(&src.join("docs/b.txt"), b"world!");
    std::os::unix::fs::symlink("docs/a.txt", src.join("link")).unwrap();
    let key = keygen(t.path());
    let cfg = s3_config(
        t.path(),
        &s3.endpoint,
        "host1",
        &[&src],
        &key,
        "hostname: nas\n",
    );
    let cfg = cfg.to_str().unwrap();
    let env = s3_env(&s3.endpoint, &key);
    let first = transcript(&["backup", cfg], &[]);
    write_file(&src.join("docs/a.txt"), b"hello again");
    write_file(&src.join("c.txt"), b"new");
    let second = transcript(&["backup", cfg], &[]);
    insta::assert_snapshot!("backup_summary", format!("{first}\n{second}"));

    let srcs = src.to_str().unwrap();
    let docs = src.join("docs");
    let docs = docs.to_str().unwrap();
    let tgt = t.path().join("r");
    let fetched = t.path().join("fetched.txt");
    let listings = [
        transcript(&["snapshots", BUCKET, "host1"], &env),
        transcript(&["ls", BUCKET, "host1", "latest", srcs], &env),
        transcript(&["ls", BUCKET, "host1", "latest", srcs, "--long"], &env),
        transcript(&["ls", BUCKET, "host1", "latest", docs, "--json"], &env),
        transcript(&["ls", BUCKET, "host1", "latest", srcs, "-R"], &env),
        transcript(
            &["ls", BUCKET, "host1", "latest", &format!("{docs}/a.txt")],
            &env,
        ),
        transcript(
            &["restore", BUCKET, "host1", "latest", tgt.to_str().unwrap()],
            &env,
        ),
        transcript(
            &[
                "fetch",
                BUCKET,
                "host1",
                "latest",
                &format!("{docs}/a.txt"),
                fetched.to_str().unwrap(),
            ],
            &env,
        ),
    ];
    // The top of the snapshot is the first directory of the temporary path.
    let top = vaultik(&["ls", BUCKET, "host1", "latest"], &env);
    let first = src
        .components()
        .nth(1)
        .unwrap()
        .as_os_str()
        .to_str()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&top.stdout), format!("/{first}/\n"));
    let mut all = listings.join("\n");
    // Short ids in the table.
    all = regex_lite_replace_short_ids(&all);
    insta::assert_snapshot!("listings", all);
    assert_eq!(std::fs::read(&fetched).unwrap(), b"hello again");
}

/// Table rows start with an 8-character id (longer only when two would look alike).
fn regex_lite_replace_short_ids(text: &str) -> String {
    text.lines()
        .map(|l| match l.split_once("  ") {
            Some((id, rest)) if id.len() == 8 && id.bytes().all(|b| b.is_ascii_hexdigit()) => {
                format!("[SHORT]  {rest}")
            }
            _ => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn any_unique_id_prefix_names_a_snapshot() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    write_file(&src.join("f"), b"0");
    let key = keygen(t.path());
    let cfg = local_config(t.path(), &[&src], &key, "");
    let repo = local_repo(t.path());
    let env = [("VAULTIK_PRIVATE_KEY", key.secret.as_str())];
    // 17 snapshots: two of them must share a first hex digit.
    for i in 0..17u8 {
        write_file(&src.join("f"), &[i]);
        backup_ok(&cfg);
    }
    let full: Vec<String> = snapshot_list(&repo, "", &env)
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect();
    let out = vaultik(&["snapshots", &repo, ""], &env);
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    let shorts: Vec<&str> = table
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next())
        .filter(|id| id.len() >= 8 && id.bytes().all(|b| b.is_ascii_hexdigit()))
        .collect();
    assert_eq!(shorts.len(), 17, "{table}");
    for (short, id) in shorts.iter().zip(&full) {
        assert!(short.len() >= 8 && id.starts_with(short), "{short} {id}");
        assert_eq!(full.iter().filter(|f| f.starts_with(short)).count(), 1);
    }
    // A short id from the table works where an id does; so does a shorter unique one.
    let f = src.join("f");
    let out = vaultik(&["ls", &repo, "", shorts[3], f.to_str().unwrap()], &env);
    assert!(out.status.success(), "{}", stderr(&out));
    let target = t.path().join("r");
    let out = vaultik(
        &["restore", &repo, "", shorts[3], target.to_str().unwrap()],
        &env,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        std::fs::read(restored(&target, &src).join("f")).unwrap(),
        [3]
    );
    let unique = (1..=32)
        .map(|n| &full[5][..n])
        .find(|p| full.iter().filter(|f| f.starts_with(p)).count() == 1)
        .unwrap();
    let out = vaultik(&["ls", &repo, "", unique, f.to_str().unwrap()], &env);
    assert!(out.status.success(), "{unique}: {}", stderr(&out));
    let upper = shorts[3].to_ascii_uppercase();
    let out = vaultik(&["ls", &repo, "", &upper, f.to_str().unwrap()], &env);
    assert!(out.status.success(), "{upper}: {}", stderr(&out));
    // An empty id is not a prefix of everything.
    let out = vaultik(&["ls", &repo, "", ""], &env);
    assert!(
        stderr(&out).contains("is not a snapshot id"),
        "{}",
        stderr(&out)
    );
    // A prefix of two is refused, naming how many it matches.
    let shared = full
        .iter()
        .map(|id| &id[..1])
        .find(|c| full.iter().filter(|f| f.starts_with(c)).count() > 1)
        .unwrap();
    let out = vaultik(&["ls", &repo, "", shared], &env);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("is ambiguous"), "{}", stderr(&out));
}

#[test]
fn storage_outages_are_ridden_out_and_a_dead_endpoint_is_one_line() {
    let s3 = S3Server::start();
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    write_file(&src.join("f"), &pseudo_random(100_000, 1));
    let key = keygen(t.path());
    // The endpoint comes up once the backup has announced its first retry.
    let port = free_port();
    let late = format!("http://127.0.0.1:{port}");
    let cfg = s3_config(t.path(), &late, "host1", &[&src], &key, "retry_for: 2m\n");
    let mut child = Command::new(env!("CARGO_BIN_EXE_vaultik"))
        .args(["backup", cfg.to_str().unwrap()])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(child.stderr.take().unwrap()));
    let first = lines.next().unwrap().unwrap();
    assert!(
        first.starts_with("vaultik: storage: cannot connect; retry 1 in"),
        "{first}"
    );
    let _proxy = CountingProxy::start_on(port, &s3.endpoint);
    let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    let status = child.wait().unwrap();
    assert!(status.success(), "{first}\n{}", rest.join("\n"));
    assert!(
        rest.iter().any(|l| l.starts_with("snapshot ")),
        "{}",
        rest.join("\n")
    );
    let env = s3_env(&s3.endpoint, &key);
    assert_eq!(snapshot_list(BUCKET, "host1", &env).len(), 1);

    // With nothing ever listening, a short window ends in the cause, on the last line.
    let dead = format!("http://127.0.0.1:{}", free_port());
    let mut unreachable = env.clone();
    unreachable.retain(|(k, _)| *k != "AWS_ENDPOINT_URL");
    unreachable.push(("AWS_ENDPOINT_URL", dead.as_str()));
    let args = ["snapshots", BUCKET, "host1", "--retry-for", "2s"];
    let out = vaultik(&args, &unreachable);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let lines: Vec<&str> = err.lines().collect();
    let (last, notices) = lines.split_last().unwrap();
    assert_eq!(
        *last,
        format!("vaultik: cannot reach {dead}: connection refused")
    );
    assert!(!notices.is_empty(), "no retry was announced: {err}");
    assert!(notices.iter().all(|l| l.contains("retry")), "{err}");
    // --verbose adds the request and object_store's own words.
    let verbose = [&args[..], &["--verbose"]].concat();
    let err = stderr(&vaultik(&verbose, &unreachable));
    assert!(err.contains("  detail: list "), "{err}");
    // Cron mode announces no retries: only the failure.
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace(&late, &dead)
        .replace("retry_for: 2m", "retry_for: 2s");
    std::fs::write(&cfg, text).unwrap();
    let out = vaultik(&["backup", cfg.to_str().unwrap(), "--cron"], &[]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("connection refused"), "{err}");
}

/// Runs vaultik under a pseudo-terminal (`script` from util-linux), as a user sees it.
fn on_terminal(args: &[&str], env: &[(&str, &str)]) -> String {
    let line = format!("{} {}", env!("CARGO_BIN_EXE_vaultik"), args.join(" "));
    let out: Output = Command::new("script")
        .args(["-qec", &line, "/dev/null"])
        .envs(env.iter().copied())
        .output()
        .expect("script comes with util-linux");
    assert!(out.status.success(), "{line}: {}", stderr(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn progress_on_a_terminal_shows_total_percentage_and_eta() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    write_file(&src.join("big.bin"), &pseudo_random(64 << 20, 7));
    write_file(&src.join("small.txt"), b"small");
    let key = keygen(t.path());
    let cfg = local_config(t.path(), &[&src], &key, "");
    let screen = on_terminal(&["backup", cfg.to_str().unwrap()], &[]);
    assert!(screen.contains("/64.00 MiB "), "{screen}");
    assert!(screen.contains("% ETA "), "{screen}");
    assert!(
        screen.contains("Files: 2 new, 0 changed, 0 unmodified"),
        "{screen}"
    );
    let target = t.path().join("r");
    let repo = local_repo(t.path());
    let screen = on_terminal(
        &["restore", &repo, "''", "latest", target.to_str().unwrap()],
        &[("VAULTIK_PRIVATE_KEY_FILE", key.file.to_str().unwrap())],
    );
    assert!(screen.contains("restore "), "{screen}");
    assert!(screen.contains("/64.00 MiB "), "{screen}");
    assert!(screen.contains("% ETA "), "{screen}");
}
