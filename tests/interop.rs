//! Interoperability with NBD clients nobody on this project wrote: nbdinfo (libnbd), qemu-img,
//! qemu-io, fio's nbd engine, nbdfuse with a loop device and ext4, against a real
//! `raftblk server` process on loopback.
//!
//! Each test starts its own server on `127.0.0.1:0` with a private data directory, so the
//! tests run in parallel. Every external command has a timeout.

#![allow(clippy::unwrap_used)] // a test may stop at the first surprise

mod common;

use std::fs;
use std::process::Command;
use std::time::Duration;

use common::mount::{checksums, require_mount_tools, MountedVolume};
use common::*;
use serde_json::Value;

const SHORT: Duration = Duration::from_secs(60);
const LONG: Duration = Duration::from_secs(180);

fn nbdinfo_json(uri: &str) -> Value {
    run_ok("nbdinfo", &["--json", uri], SHORT).stdout_json()
}

/// The export entry named `name` in `nbdinfo --json` output (`exports` array).
fn find_export<'a>(nbdinfo_output: &'a Value, name: &str) -> Option<&'a Value> {
    nbdinfo_output["exports"]
        .as_array()?
        .iter()
        .find(|export| export["export-name"] == name)
}

/// `nbdinfo --list` (NBD_OPT_LIST then NBD_OPT_INFO per export) and `nbdinfo --json` (NBD_OPT_GO)
/// report the default volume exactly as the server's contract states: 1 GiB, writable, every
/// transmission flag it promises, `base:allocation`, and block sizes 512 / 4096 / 32 MiB.
/// Reference: doc/proto.md "Transmission flags", "NBD_INFO_BLOCK_SIZE", "base:allocation".
#[test]
fn nbdinfo_reports_size_flags_contexts_and_block_sizes() {
    require_tools(&["nbdinfo"]);
    let server = ServerProcess::start();
    let address = server.nbd_address();

    let listing = run_ok("nbdinfo", &["--list", &format!("nbd://{address}")], SHORT);
    let listing_text = listing.stdout_text();
    assert!(
        listing_text.contains("export=\"disk0\""),
        "nbdinfo --list must show the default volume disk0\n{}",
        listing.describe()
    );
    assert!(
        listing_text.contains("export-size: 1073741824"),
        "nbdinfo --list must show disk0's size of 1 GiB\n{}",
        listing.describe()
    );

    let listing_json = run_ok(
        "nbdinfo",
        &["--list", "--json", &format!("nbd://{address}")],
        SHORT,
    )
    .stdout_json();
    let listed = find_export(&listing_json, DEFAULT_EXPORT_NAME)
        .unwrap_or_else(|| panic!("disk0 missing from nbdinfo --list --json: {listing_json:#}"));
    assert_eq!(
        listed["export-size"], DEFAULT_EXPORT_SIZE_BYTES,
        "{listed:#}"
    );

    let info = nbdinfo_json(&server.uri(DEFAULT_EXPORT_NAME));
    assert_eq!(info["protocol"], "newstyle-fixed", "{info:#}");
    assert_eq!(info["structured"], true, "structured replies: {info:#}");
    let export = find_export(&info, DEFAULT_EXPORT_NAME)
        .unwrap_or_else(|| panic!("nbdinfo --json lacks export disk0: {info:#}"));
    assert_eq!(
        export["export-size"], DEFAULT_EXPORT_SIZE_BYTES,
        "{export:#}"
    );
    assert_eq!(export["is_read_only"], false, "{export:#}");
    for capability in [
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_fast_zero",
        "can_cache",
        "can_df",
        "can_multi_conn",
    ] {
        assert_eq!(
            export[capability], true,
            "{capability} must be advertised (contract: SEND_FLUSH, SEND_FUA, SEND_TRIM, \
             SEND_WRITE_ZEROES, SEND_FAST_ZERO, SEND_CACHE, SEND_DF, CAN_MULTI_CONN): {export:#}"
        );
    }
    let contexts: Vec<&str> = export["contexts"]
        .as_array()
        .map(|contexts| contexts.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    assert!(
        contexts.contains(&"base:allocation"),
        "base:allocation must be offered: {export:#}"
    );
    assert_eq!(export["block_size_minimum"], 512, "{export:#}");
    assert_eq!(export["block_size_preferred"], 4096, "{export:#}");
    assert_eq!(export["block_size_maximum"], 32 * MIB, "{export:#}");
}

/// Writes `file` into the volume with `qemu-img convert -n`, checks it with `qemu-img compare`
/// (which also requires the rest of the 1 GiB volume to read as zeroes), reads exactly the
/// first 64 MiB back through qemu's raw `size` option, and compares the bytes with `cmp`.
#[test]
fn qemu_img_convert_round_trip_of_random_64_mib_image() {
    require_tools(&["qemu-img", "cmp"]);
    let server = ServerProcess::start();
    let mut random = SplitMix64::from_environment_or_clock("qemu_img_convert_round_trip");
    let workspace = server.workspace().to_owned();
    let input = workspace.join("input.raw");
    let output = workspace.join("output.raw");
    write_random_file(&input, 64 * MIB, &mut random);
    let uri = server.uri(DEFAULT_EXPORT_NAME);

    run_ok(
        "qemu-img",
        &[
            "convert".as_ref(),
            "-f".as_ref(),
            "raw".as_ref(),
            "-O".as_ref(),
            "raw".as_ref(),
            "-n".as_ref(),
            input.as_os_str(),
            uri.as_ref(),
        ],
        LONG,
    );
    let compare = run_command(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&input)
            .arg(&uri),
        LONG,
    );
    assert!(
        compare.status.success(),
        "qemu-img compare found a difference between the image and the volume\n{}",
        compare.describe()
    );

    let port = server.nbd_address().port();
    let first_64_mib = format!(
        "json:{{\"driver\":\"raw\",\"size\":{},\"file\":{{\"driver\":\"nbd\",\
         \"server\":{{\"type\":\"inet\",\"host\":\"127.0.0.1\",\"port\":\"{port}\"}},\
         \"export\":\"{DEFAULT_EXPORT_NAME}\"}}}}",
        64 * MIB
    );
    run_ok(
        "qemu-img",
        &[
            "convert".as_ref(),
            "-O".as_ref(),
            "raw".as_ref(),
            first_64_mib.as_ref(),
            output.as_os_str(),
        ],
        LONG,
    );
    assert_eq!(
        fs::metadata(&output).expect("output image").len(),
        64 * MIB,
        "the image read back must be 64 MiB"
    );
    run_ok("cmp", &[input.as_os_str(), output.as_os_str()], SHORT);
}

/// nbdcopy uses several connections at once when the server advertises CAN_MULTI_CONN
/// (doc/proto.md "NBD_FLAG_CAN_MULTI_CONN"): copy a random 64 MiB image in over 4 connections
/// with 16 requests in flight each and a final flush, copy the whole volume out again the same
/// way, and compare: the first 64 MiB equal the image and the rest of the volume is zeroes.
#[test]
fn nbdcopy_over_four_connections_round_trip() {
    require_tools(&["nbdcopy", "cmp", "qemu-img"]);
    let server = ServerProcess::start();
    let mut random = SplitMix64::from_environment_or_clock("nbdcopy_over_four_connections");
    let workspace = server.workspace().to_owned();
    let input = workspace.join("input.raw");
    let output = workspace.join("output.raw");
    write_random_file(&input, 64 * MIB, &mut random);
    let uri = server.uri(DEFAULT_EXPORT_NAME);
    let copy = |source: &std::ffi::OsStr, destination: &std::ffi::OsStr| {
        run_command(
            Command::new("nbdcopy")
                .args(["--connections=4", "--requests=16", "--flush"])
                .arg(source)
                .arg(destination),
            LONG,
        )
        .assert_success()
    };
    copy(input.as_os_str(), uri.as_ref());
    copy(uri.as_ref(), output.as_os_str());
    assert_eq!(
        fs::metadata(&output).expect("output image").len(),
        DEFAULT_EXPORT_SIZE_BYTES,
        "nbdcopy copies the whole volume out"
    );
    run_ok(
        "cmp",
        &[
            "-n".as_ref(),
            (64 * MIB).to_string().as_ref(),
            input.as_os_str(),
            output.as_os_str(),
        ],
        SHORT,
    );
    // Non-strict compare: the longer image must be all zeroes past the shorter one.
    run_ok(
        "qemu-img",
        &[
            "compare".as_ref(),
            "-f".as_ref(),
            "raw".as_ref(),
            "-F".as_ref(),
            "raw".as_ref(),
            input.as_os_str(),
            output.as_os_str(),
        ],
        LONG,
    );
}

/// Runs qemu-io with `commands` against `uri` and fails unless every command succeeded and no
/// pattern check failed (qemu-io prints "Pattern verification failed" on a mismatch).
#[track_caller]
fn qemu_io(uri: &str, commands: &[String]) {
    let mut command = Command::new("qemu-io");
    command.args(["-f", "raw"]);
    for one in commands {
        command.arg("-c").arg(one);
    }
    command.arg(uri);
    let result = run_command(&mut command, LONG);
    let output = format!("{}{}", result.stdout_text(), result.stderr_text());
    assert!(
        result.status.success()
            && !output.contains("Pattern verification failed")
            && !output.contains("failed:"),
        "qemu-io reported a failure\n{}",
        result.describe()
    );
}

/// Pattern writes at aligned, 512-aligned and unaligned offsets (qemu does read-modify-write
/// for the unaligned ones, as the 512-byte minimum block size asks), including the last block
/// of the device, verified with `read -P` on the same and on a new connection, and zeroes
/// around each pattern stay zero.
#[test]
fn qemu_io_pattern_writes_read_back() {
    require_tools(&["qemu-io"]);
    let server = ServerProcess::start();
    let uri = server.uri(DEFAULT_EXPORT_NAME);
    let last_block = GIB - 4096;
    // (pattern, offset, length)
    let writes: [(u8, u64, u64); 6] = [
        (0xab, 0, MIB),
        (0xcd, 5 * MIB + 512, 4096),
        (0x5a, 9 * MIB + 12_345, 1_000),
        (0x3c, 17 * MIB - 100, 8_392),
        (0xe7, 300 * MIB, 3 * MIB + 4096),
        (0x77, last_block, 4096),
    ];
    let write_commands: Vec<String> = writes
        .iter()
        .map(|(pattern, offset, length)| format!("write -P {pattern:#04x} {offset} {length}"))
        .collect();
    let mut read_commands: Vec<String> = writes
        .iter()
        .map(|(pattern, offset, length)| format!("read -P {pattern:#04x} {offset} {length}"))
        .collect();
    // The bytes just around each unaligned pattern must still be zero.
    read_commands.push(format!("read -P 0 {} 512", 9 * MIB + 12_345 - 512));
    read_commands.push(format!("read -P 0 {} 512", 9 * MIB + 13_345));
    read_commands.push(format!("read -P 0 {} 100", 17 * MIB - 200));
    read_commands.push(format!("read -P 0 {} 4096", 17 * MIB - 100 + 8_392));
    read_commands.push(format!("read -P 0 {} 4096", last_block - 4096));

    let mut same_connection = write_commands.clone();
    same_connection.extend(read_commands.iter().cloned());
    qemu_io(&uri, &same_connection);
    // A second connection sees the same data.
    qemu_io(&uri, &read_commands);
    // Overwrite part of a pattern with zeroes (WRITE_ZEROES) and check both sides.
    qemu_io(
        &uri,
        &[
            format!("write -z {} 65536", 300 * MIB + MIB),
            format!("read -P 0 {} 65536", 300 * MIB + MIB),
            format!("read -P 0xe7 {} {}", 300 * MIB, MIB),
            format!(
                "read -P 0xe7 {} {}",
                300 * MIB + MIB + 65536,
                2 * MIB + 4096 - 65536
            ),
        ],
    );
}

/// fio's nbd engine (libnbd) writes 64 MiB of random 4 KiB blocks with 32 requests in flight,
/// then reads every block back and checks its crc32c.
#[test]
fn fio_random_writes_with_crc32c_verify() {
    require_tools(&["fio"]);
    let server = ServerProcess::start();
    let uri = server.uri(DEFAULT_EXPORT_NAME);
    let result = run_command(
        Command::new("fio")
            .arg("--name=verify")
            .arg("--ioengine=nbd")
            .arg(format!("--uri={uri}"))
            .args([
                "--rw=randwrite",
                "--bs=4k",
                "--iodepth=32",
                "--size=64m",
                "--verify=crc32c",
                "--do_verify=1",
                "--verify_fatal=1",
                "--output-format=json",
            ]),
        LONG,
    );
    assert!(result.status.success(), "fio failed\n{}", result.describe());
    let report = result.stdout_json();
    let job = &report["jobs"][0];
    assert_eq!(job["error"], 0, "fio job error\n{}", result.describe());
    assert_eq!(
        job["write"]["io_bytes"].as_u64(),
        Some(64 * MIB),
        "fio must have written all 64 MiB\n{}",
        result.describe()
    );
    assert_eq!(
        job["read"]["io_bytes"].as_u64(),
        Some(64 * MIB),
        "fio must have read back (verified) all 64 MiB\n{}",
        result.describe()
    );
}

/// Extent map from `nbdinfo --map --json` as (offset, length, type) where type bit 0 is
/// NBD_STATE_HOLE and bit 1 NBD_STATE_ZERO (doc/proto.md "base:allocation metadata context").
fn extent_map(uri: &str) -> Vec<(u64, u64, u64)> {
    let map = run_ok("nbdinfo", &["--map", "--json", uri], SHORT).stdout_json();
    map.as_array()
        .unwrap_or_else(|| panic!("nbdinfo --map --json is not an array: {map:#}"))
        .iter()
        .map(|extent| {
            let field = |name: &str| {
                extent[name]
                    .as_u64()
                    .unwrap_or_else(|| panic!("extent lacks {name}: {extent}"))
            };
            (field("offset"), field("length"), field("type"))
        })
        .collect()
}

/// Every extent overlapping [start, end) must satisfy `predicate` on its type.
#[track_caller]
fn assert_extents(
    map: &[(u64, u64, u64)],
    start: u64,
    end: u64,
    what: &str,
    predicate: impl Fn(u64) -> bool,
) {
    let overlapping: Vec<_> = map
        .iter()
        .filter(|(offset, length, _)| *offset < end && offset + length > start)
        .collect();
    assert!(
        !overlapping.is_empty(),
        "no extent covers [{start}, {end}): {map:?}"
    );
    for (offset, length, extent_type) in overlapping {
        assert!(
            predicate(*extent_type),
            "[{start}, {end}) must be {what}, but extent [{offset}, +{length}) has type \
             {extent_type}; whole map: {map:?}"
        );
    }
}

/// After data is written, a TRIM and a WRITE_ZEROES that may punch (qemu-io `write -z -u`)
/// turn their ranges into holes that BLOCK_STATUS reports; the data around them stays data.
/// Reference: doc/proto.md "NBD_CMD_TRIM", "NBD_CMD_WRITE_ZEROES", "base:allocation".
#[test]
fn nbdinfo_map_shows_holes_after_trim_and_zero() {
    require_tools(&["qemu-io", "nbdinfo"]);
    let server = ServerProcess::start();
    let uri = server.uri(DEFAULT_EXPORT_NAME);
    let base = 64 * MIB;
    qemu_io(&uri, &[format!("write -P 0x11 {base} {}", 4 * MIB)]);
    let before = extent_map(&uri);
    assert_extents(&before, base, base + 4 * MIB, "data", |t| t & 1 == 0);

    qemu_io(
        &uri,
        &[
            format!("discard {} {}", base + MIB, MIB),
            format!("write -z -u {} {}", base + 3 * MIB, 512 * KIB),
            format!("read -P 0 {} {}", base + 3 * MIB, 512 * KIB),
            format!("read -P 0x11 {base} {MIB}"),
            format!("read -P 0x11 {} {MIB}", base + 2 * MIB),
            format!("read -P 0x11 {} {}", base + 3 * MIB + 512 * KIB, 512 * KIB),
        ],
    );
    let after = extent_map(&uri);
    assert_extents(&after, base, base + MIB, "data", |t| t & 1 == 0);
    assert_extents(
        &after,
        base + MIB,
        base + 2 * MIB,
        "a hole after TRIM",
        |t| t & 1 == 1,
    );
    assert_extents(&after, base + 2 * MIB, base + 3 * MIB, "data", |t| {
        t & 1 == 0
    });
    assert_extents(
        &after,
        base + 3 * MIB,
        base + 3 * MIB + 512 * KIB,
        "a zero hole after WRITE_ZEROES without NO_HOLE",
        |t| t == 3,
    );
    assert_extents(
        &after,
        base + 3 * MIB + 512 * KIB,
        base + 4 * MIB,
        "data",
        |t| t & 1 == 0,
    );
    // A never-written region of a fresh sparse volume is a hole too.
    assert_extents(
        &after,
        512 * MIB,
        513 * MIB,
        "a hole (never written)",
        |t| t == 3,
    );
}

/// A real filesystem on a volume: nbdfuse + losetup + mkfs.ext4 + mount, write files, unmount
/// and tear everything down, restart the server cleanly (SIGTERM, same data directory), then
/// fsck and mount again: the filesystem is clean and every file has the same sha256. (A leader
/// killed while ext4 is mounted and written: `tests/cluster.rs`.)
#[test]
fn ext4_on_nbdfuse_loop_device_survives_a_clean_server_restart() {
    require_mount_tools();
    let mut server = ServerProcess::start();
    let mut random = SplitMix64::from_environment_or_clock("ext4_on_nbdfuse");
    let workspace = server.workspace().to_owned();

    // Source files: a few sizes, including a multi-MiB one and an odd-sized one.
    let source = workspace.join("source");
    fs::create_dir_all(source.join("nested/deeper")).expect("create source tree");
    let files: [(&str, usize); 5] = [
        ("big.bin", 6 * MIB as usize + 123),
        ("small.txt", 17),
        ("nested/page.bin", 4096),
        ("nested/deeper/odd.bin", 100_003),
        ("empty", 0),
    ];
    for (name, size) in files {
        fs::write(source.join(name), random.bytes(size)).expect("write source file");
    }
    let expected = checksums(&source);
    assert_eq!(expected.len(), files.len(), "checksums of all source files");

    let mut volume = MountedVolume::attach_nbd(
        &server.uri(DEFAULT_EXPORT_NAME),
        &workspace,
        "first",
        DEFAULT_EXPORT_SIZE_BYTES,
    );
    volume.make_ext4();
    volume.mount();
    run_ok(
        "cp",
        &[
            "-r".as_ref(),
            source.join(".").as_os_str(),
            volume.mount_directory.as_os_str(),
        ],
        LONG,
    );
    run_ok("sync", &[] as &[&str], LONG);
    assert_eq!(
        checksums(&volume.mount_directory),
        expected,
        "files on the mounted volume"
    );
    volume.detach();

    server.terminate_cleanly();
    server.restart();

    let mut volume = MountedVolume::attach_nbd(
        &server.uri(DEFAULT_EXPORT_NAME),
        &workspace,
        "second",
        DEFAULT_EXPORT_SIZE_BYTES,
    );
    let fsck = run_command(
        Command::new("e2fsck").args(["-f", "-n", volume.device()]),
        LONG,
    );
    assert!(
        fsck.status.success(),
        "the filesystem must be clean after the restart\n{}",
        fsck.describe()
    );
    volume.mount();
    assert_eq!(
        checksums(&volume.mount_directory),
        expected,
        "files after unmount, server restart and remount"
    );
    volume.detach();
}

/// Finds, anywhere in `json`, an object that has a string field equal to `name`.
fn json_object_naming<'a>(json: &'a Value, name: &str) -> Option<&'a Value> {
    match json {
        Value::Object(map) => {
            if map.values().any(|value| value == name) {
                return Some(json);
            }
            map.values()
                .find_map(|value| json_object_naming(value, name))
        }
        Value::Array(items) => items.iter().find_map(|item| json_object_naming(item, name)),
        _ => None,
    }
}

/// `raftblk volume create / list / delete` round trip, each step visible to NBD clients:
/// the new volume appears in `nbdinfo --list` with its size and serves reads and writes; after
/// delete it is gone from the list and cannot be opened, and disk0 is untouched.
#[test]
fn volume_create_list_delete_round_trip_visible_over_nbd() {
    require_tools(&["nbdinfo", "qemu-io"]);
    let server = ServerProcess::start();
    let address = server.nbd_address();
    let name = "scratch-volume";

    server
        .run_cli(&[
            "volume",
            "create",
            name,
            "--size",
            "64M",
            "--block-size",
            "4096",
        ])
        .assert_success();

    let listing = server.run_cli(&["volume", "list"]).assert_success();
    assert!(
        listing.stdout_text().contains(name),
        "volume list must show {name}\n{}",
        listing.describe()
    );
    let listing_json = server
        .run_cli(&["volume", "list", "--json"])
        .assert_success();
    let json = listing_json.stdout_json();
    let entry = json_object_naming(&json, name)
        .unwrap_or_else(|| panic!("volume list --json lacks {name}: {json:#}"));
    let entry_numbers: Vec<u64> = entry
        .as_object()
        .map(|map| map.values().filter_map(Value::as_u64).collect())
        .unwrap_or_default();
    assert!(
        entry_numbers.contains(&(64 * MIB)),
        "volume list --json must give {name}'s size in bytes (67108864): {entry:#}"
    );
    assert!(
        json_object_naming(&json, DEFAULT_EXPORT_NAME).is_some(),
        "volume list --json must still show disk0: {json:#}"
    );

    let nbd_listing = run_ok(
        "nbdinfo",
        &["--list", "--json", &format!("nbd://{address}")],
        SHORT,
    )
    .stdout_json();
    let export = find_export(&nbd_listing, name)
        .unwrap_or_else(|| panic!("nbdinfo --list lacks {name}: {nbd_listing:#}"));
    assert_eq!(export["export-size"], 64 * MIB, "{export:#}");
    assert_eq!(export["block_size_preferred"], 4096, "{export:#}");
    qemu_io(
        &server.uri(name),
        &[
            format!("write -P 0x42 {} {}", 60 * MIB, MIB),
            format!("read -P 0x42 {} {}", 60 * MIB, MIB),
        ],
    );

    server.run_cli(&["volume", "delete", name]).assert_success();
    let listing = server.run_cli(&["volume", "list"]).assert_success();
    assert!(
        !listing.stdout_text().contains(name),
        "volume list must no longer show {name}\n{}",
        listing.describe()
    );
    let nbd_listing = run_ok(
        "nbdinfo",
        &["--list", "--json", &format!("nbd://{address}")],
        SHORT,
    )
    .stdout_json();
    assert!(
        find_export(&nbd_listing, name).is_none(),
        "nbdinfo --list still shows the deleted {name}: {nbd_listing:#}"
    );
    assert!(
        find_export(&nbd_listing, DEFAULT_EXPORT_NAME).is_some(),
        "disk0 must survive deleting another volume: {nbd_listing:#}"
    );
    let open_deleted = run_command(Command::new("nbdinfo").arg(server.uri(name)), SHORT);
    assert!(
        !open_deleted.status.success(),
        "opening the deleted volume must fail\n{}",
        open_deleted.describe()
    );
}
