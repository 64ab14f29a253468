use super::*;
use crate::storage::command::{encode_command, encode_write_command};
use crate::storage::{open_db, StorageOptions};

const KIB: u64 = 1024;

struct Fixture {
    directory: tempfile::TempDir,
    state_machine: StateMachine,
    next_index: u64,
}

fn small_options() -> StorageOptions {
    StorageOptions {
        block_cache_bytes: 1 << 20,
        write_buffer_bytes: 1 << 20,
        max_background_jobs: 1,
    }
}

impl Fixture {
    fn new() -> Self {
        let directory = tempfile::tempdir().unwrap();
        let db = open_db(directory.path(), &small_options()).unwrap();
        let state_machine = StateMachine::open(db, &directory.path().join("images"), 1).unwrap();
        Fixture {
            directory,
            state_machine,
            next_index: 1,
        }
    }

    fn reopen(self) -> Self {
        let Fixture {
            directory,
            state_machine,
            ..
        } = self;
        drop(state_machine);
        let db = open_db(directory.path(), &small_options()).unwrap();
        let state_machine = StateMachine::open(db, &directory.path().join("images"), 1).unwrap();
        let next_index = state_machine.applied_index() + 1;
        Fixture {
            directory,
            state_machine,
            next_index,
        }
    }

    fn apply(&mut self, data: &[u8]) -> ApplyOutcome {
        let index = self.next_index;
        self.next_index += 1;
        self.state_machine.apply(index, data).unwrap()
    }

    fn create(&mut self, name: &str, size_bytes: u64, block_size_bytes: u32) -> VolumeInfo {
        match self.apply(&encode_command(&Command::CreateVolume {
            name,
            size_bytes,
            block_size_bytes,
        })) {
            ApplyOutcome::VolumeCreated(info) => info,
            other => panic!("create returned {other:?}"),
        }
    }

    fn image_path(&self, volume_id: u64) -> PathBuf {
        self.directory
            .path()
            .join("images")
            .join(image_file_name(1, volume_id, 0))
    }
}

fn read(reader: &VolumeReader, offset: u64, length: u64) -> Vec<u8> {
    let mut buf = vec![0u8; length as usize];
    reader.read(offset, &mut buf).unwrap();
    buf
}

#[test]
fn create_write_read_at_unaligned_offsets() {
    let mut fixture = Fixture::new();
    let info = fixture.create("disk", 256 * KIB, 4096);
    assert_eq!(
        info.id, 1,
        "the volume id is the index of its CreateVolume entry"
    );
    assert_eq!(
        fixture.state_machine.volume_by_name("disk"),
        Some(info.clone())
    );
    let data: Vec<u8> = (0..10_000u32)
        .map(|value| (value % 253) as u8 + 1)
        .collect();
    assert_eq!(
        fixture.apply(&encode_write_command(info.id, 0, 3000, &data)),
        ApplyOutcome::Applied
    );
    let reader = fixture.state_machine.reader(info.id).unwrap();
    assert_eq!(read(&reader, 3000, 10_000), data);
    assert_eq!(read(&reader, 0, 3000), vec![0u8; 3000]);
    assert_eq!(read(&reader, 2999, 2)[..], [0, data[0]]);
    assert!(matches!(
        reader.read(256 * KIB - 1, &mut [0u8; 2]),
        Err(StorageError::OutOfRange { .. })
    ));
}

#[test]
fn resize_grows_online_refuses_to_shrink_and_survives_reopen() {
    let mut fixture = Fixture::new();
    let info = fixture.create("disk", 64 * KIB, 4096);
    fixture.apply(&encode_write_command(info.id, 0, 60 * KIB, &[5u8; 4096]));
    let reader = fixture.state_machine.reader(info.id).unwrap();
    assert!(reader.read(64 * KIB, &mut [0u8; 4096]).is_err());
    let resize = |size_bytes| {
        encode_command(&Command::ResizeVolume {
            name: "disk",
            size_bytes,
        })
    };
    match fixture.apply(&resize(128 * KIB)) {
        ApplyOutcome::VolumeResized(resized) => assert_eq!(resized.size_bytes, 128 * KIB),
        other => panic!("resize returned {other:?}"),
    }
    // The reader taken before the resize sees the new range, zeroes, and the old data.
    assert_eq!(reader.info().size_bytes, 128 * KIB);
    assert_eq!(read(&reader, 64 * KIB, 4096), vec![0u8; 4096]);
    assert_eq!(read(&reader, 60 * KIB, 4096), vec![5u8; 4096]);
    assert_eq!(
        fixture.apply(&encode_write_command(info.id, 0, 100 * KIB, &[6u8; 4096])),
        ApplyOutcome::Applied
    );
    assert_eq!(
        fixture.apply(&resize(64 * KIB)),
        ApplyOutcome::Rejected(ApplyRejection::WouldShrink)
    );
    assert_eq!(
        fixture.apply(&resize(128 * KIB + 1)),
        ApplyOutcome::Rejected(ApplyRejection::InvalidCommand)
    );
    assert!(matches!(
        fixture.apply(&resize(128 * KIB)),
        ApplyOutcome::VolumeResized(_)
    ));
    fixture.state_machine.make_durable().unwrap();
    // A reader holds the database open.
    drop(reader);
    let fixture = fixture.reopen();
    let reopened = fixture.state_machine.volume_by_name("disk").unwrap();
    assert_eq!(reopened.size_bytes, 128 * KIB);
    let reader = fixture.state_machine.reader(info.id).unwrap();
    assert_eq!(read(&reader, 100 * KIB, 4096), vec![6u8; 4096]);
}

#[test]
fn an_image_grown_without_its_row_is_cut_back_on_open() {
    let mut fixture = Fixture::new();
    let info = fixture.create("disk", 64 * KIB, 4096);
    let path = fixture.image_path(info.id);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(128 * KIB)
        .unwrap();
    let fixture = fixture.reopen();
    assert_eq!(
        fixture
            .state_machine
            .volume_by_name("disk")
            .unwrap()
            .size_bytes,
        64 * KIB
    );
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 64 * KIB);
}

#[test]
fn background_checkpoint_never_moves_the_durable_index_backwards() {
    let mut fixture = Fixture::new();
    let info = fixture.create("disk", 256 * KIB, 4096);
    fixture.apply(&encode_write_command(info.id, 0, 0, &[7u8; 4096]));
    let ticket = fixture
        .state_machine
        .begin_checkpoint()
        .expect("a write since the last checkpoint needs one");
    let captured = ticket.applied_index();
    assert!(
        fixture.state_machine.begin_checkpoint().is_none(),
        "one background checkpoint at a time"
    );
    // More writes while the ticket's images sync, then an inline checkpoint: it covers the
    // ticket's images too and records the later index.
    fixture.apply(&encode_write_command(info.id, 0, 8192, &[9u8; 4096]));
    let inline = fixture.state_machine.make_durable().unwrap();
    assert!(inline > captured);
    ticket.sync_images().unwrap();
    assert_eq!(
        fixture.state_machine.finish_checkpoint(ticket).unwrap(),
        inline
    );
    assert_eq!(fixture.state_machine.durable_applied_index(), inline);
    // A normal cycle records exactly the captured index.
    fixture.apply(&encode_write_command(info.id, 0, 0, &[1u8; 4096]));
    let ticket = fixture.state_machine.begin_checkpoint().unwrap();
    let captured = ticket.applied_index();
    fixture.apply(&encode_write_command(info.id, 0, 4096, &[2u8; 4096]));
    ticket.sync_images().unwrap();
    assert_eq!(
        fixture.state_machine.finish_checkpoint(ticket).unwrap(),
        captured
    );
    assert!(fixture.state_machine.applied_index() > captured);
    // An aborted ticket gives its images back to the next checkpoint.
    let ticket = fixture.state_machine.begin_checkpoint().unwrap();
    fixture.state_machine.abort_checkpoint(ticket);
    assert!(fixture.state_machine.begin_checkpoint().is_some());
}

#[test]
fn cached_reads_match_blocking_reads_or_decline() {
    let mut fixture = Fixture::new();
    let info = fixture.create("disk", 256 * KIB, 4096);
    let data: Vec<u8> = (0..20_000u32).map(|value| (value % 251) as u8).collect();
    fixture.apply(&encode_write_command(info.id, 0, 1000, &data));
    let reader = fixture.state_machine.reader(info.id).unwrap();
    // Just written, so in the page cache: served, and equal to the blocking read.
    let mut cached = vec![0u8; 20_000];
    assert!(reader.read_cached(1000, &mut cached).unwrap());
    assert_eq!(cached, data);
    let mut aligned = vec![0u8; 8192];
    assert!(reader.read_cached(4096, &mut aligned).unwrap());
    assert_eq!(aligned, read(&reader, 4096, 8192));
    // Whatever the cache holds, a declined read is never a wrong read.
    let mut far = vec![0u8; 4096];
    if reader.read_cached(200 * KIB, &mut far).unwrap() {
        assert_eq!(far, vec![0u8; 4096]);
    }
}

#[test]
fn rejections_are_outcomes_not_errors() {
    let mut fixture = Fixture::new();
    let info = fixture.create("disk", 64 * KIB, 4096);
    let rejected = |rejection| ApplyOutcome::Rejected(rejection);
    assert_eq!(
        fixture.apply(&encode_write_command(99, 0, 0, b"x")),
        rejected(ApplyRejection::NoSuchVolume)
    );
    assert_eq!(
        fixture.apply(&encode_write_command(info.id, 0, 64 * KIB, b"x")),
        rejected(ApplyRejection::OutOfRange)
    );
    assert_eq!(
        fixture.apply(&encode_command(&Command::Trim {
            volume_id: info.id,
            writer_epoch: 0,
            offset: u64::MAX,
            length: 2
        })),
        rejected(ApplyRejection::OutOfRange)
    );
    assert_eq!(
        fixture.apply(b"\x01\xff"),
        rejected(ApplyRejection::InvalidCommand)
    );
    for (size_bytes, block_size_bytes) in [
        (0, 4096),
        (4097, 4096),
        (8192, 3000),
        (8192, 256),
        (1 << 45, 4096),
    ] {
        assert_eq!(
            fixture.apply(&encode_command(&Command::CreateVolume {
                name: "bad",
                size_bytes,
                block_size_bytes
            })),
            rejected(ApplyRejection::InvalidCommand),
            "size {size_bytes} block {block_size_bytes}"
        );
    }
    assert_eq!(
        fixture.apply(&encode_command(&Command::CreateVolume {
            name: "disk",
            size_bytes: 8192,
            block_size_bytes: 4096
        })),
        rejected(ApplyRejection::VolumeExists)
    );
    assert_eq!(
        fixture.apply(&encode_command(&Command::DeleteVolume { name: "nope" })),
        rejected(ApplyRejection::NoSuchVolume)
    );
    assert_eq!(fixture.apply(b""), ApplyOutcome::Applied);
    assert_eq!(
        fixture.state_machine.applied_index(),
        fixture.next_index - 1
    );
    assert_eq!(fixture.state_machine.volumes(), vec![info]);
}

fn attach(fixture: &mut Fixture, client: &str, force: bool) -> ApplyOutcome {
    attach_with_id(fixture, client, force, None)
}

fn attach_with_id(
    fixture: &mut Fixture,
    client: &str,
    force: bool,
    attach_id: Option<u64>,
) -> ApplyOutcome {
    fixture.apply(&encode_command(&Command::Attach {
        name: "disk",
        client,
        force,
        attach_id,
    }))
}

/// An attach request repeated with its attach id (a retry that commits late, on any
/// server) gets the attachment it made, without a new epoch; survives a reopen.
#[test]
fn a_repeated_attach_id_keeps_the_epoch_it_made() {
    let mut fixture = Fixture::new();
    let info = fixture.create("disk", 64 * KIB, 4096);
    let first = attached_epoch(&attach_with_id(&mut fixture, "host-a", false, Some(7)));
    let retry = attach_with_id(&mut fixture, "host-a", false, Some(7));
    assert_eq!(attached_epoch(&retry), first, "a retry keeps the epoch");
    assert_eq!(
        write_with_epoch(&mut fixture, info.id, first, 1),
        ApplyOutcome::Applied
    );
    // Still the same after the attachment was reloaded from RocksDB.
    let mut fixture = fixture.reopen();
    let retry = attach_with_id(&mut fixture, "host-a", false, Some(7));
    assert_eq!(attached_epoch(&retry), first);
    // A new request of the holder (another id, or none) starts a new epoch and fences the
    // old one; a retry of the old request after that is a new attachment again.
    let second = attached_epoch(&attach_with_id(&mut fixture, "host-a", false, Some(8)));
    assert!(second > first);
    assert_eq!(
        write_with_epoch(&mut fixture, info.id, first, 2),
        ApplyOutcome::Rejected(ApplyRejection::Fenced)
    );
    let third = attached_epoch(&attach(&mut fixture, "host-a", false));
    assert!(third > second);
    // Another client with the holder's attach id is not the holder: refused unless forced.
    let fourth = attached_epoch(&attach_with_id(&mut fixture, "host-a", false, Some(9)));
    assert_eq!(
        attach_with_id(&mut fixture, "host-b", false, Some(9)),
        ApplyOutcome::Rejected(ApplyRejection::AttachedByOther)
    );
    let taken = attached_epoch(&attach_with_id(&mut fixture, "host-b", true, Some(9)));
    assert!(taken > fourth);
    assert_eq!(
        write_with_epoch(&mut fixture, info.id, fourth, 3),
        ApplyOutcome::Rejected(ApplyRejection::Fenced)
    );
}

fn attached_epoch(outcome: &ApplyOutcome) -> u64 {
    match outcome {
        ApplyOutcome::Attached(VolumeInfo {
            attachment: Some(attachment),
            ..
        }) => attachment.epoch,
        other => panic!("attach returned {other:?}"),
    }
}

fn write_with_epoch(fixture: &mut Fixture, volume_id: u64, epoch: u64, fill: u8) -> ApplyOutcome {
    fixture.apply(&encode_write_command(volume_id, epoch, 0, &[fill; 4096]))
}

fn zeroing_commands(volume_id: u64, writer_epoch: u64) -> [Vec<u8>; 2] {
    [
        encode_command(&Command::Trim {
            volume_id,
            writer_epoch,
            offset: 0,
            length: 4096,
        }),
        encode_command(&Command::WriteZeroes {
            volume_id,
            writer_epoch,
            offset: 0,
            length: 4096,
            may_punch_hole: false,
        }),
    ]
}

/// Fencing rule: an unattached volume takes data commands with writer epoch 0 only.
#[test]
fn unattached_volume_admits_only_epoch_zero() {
    let mut fixture = Fixture::new();
    let info = fixture.create("disk", 64 * KIB, 4096);
    assert_eq!(info.attachment, None);
    assert_eq!(
        write_with_epoch(&mut fixture, info.id, 0, 1),
        ApplyOutcome::Applied
    );
    assert_eq!(
        write_with_epoch(&mut fixture, info.id, 5, 2),
        ApplyOutcome::Rejected(ApplyRejection::Fenced)
    );
    for command in zeroing_commands(info.id, 5) {
        assert_eq!(
            fixture.apply(&command),
            ApplyOutcome::Rejected(ApplyRejection::Fenced)
        );
    }
    let reader = fixture.state_machine.reader(info.id).unwrap();
    assert_eq!(
        read(&reader, 0, 4096),
        vec![1u8; 4096],
        "fenced commands change nothing"
    );
}

/// Fencing rules: the epoch is the index of the Attach entry; only that epoch may write;
/// the same client attaching again gets a new epoch and fences its own old one.
#[test]
fn attached_volume_admits_only_the_current_epoch() {
    let mut fixture = Fixture::new();
    let info = fixture.create("disk", 64 * KIB, 4096);
    let attach_index = fixture.next_index;
    let outcome = attach(&mut fixture, "host-a", false);
    let epoch = attached_epoch(&outcome);
    assert_eq!(
        epoch, attach_index,
        "the epoch is the index of the Attach entry"
    );
    assert_eq!(
        fixture
            .state_machine
            .volume_by_name("disk")
            .unwrap()
            .attachment,
        Some(Attachment {
            client: "host-a".to_string(),
            epoch,
            attach_id: None,
        })
    );
    assert_eq!(
        write_with_epoch(&mut fixture, info.id, 0, 1),
        ApplyOutcome::Rejected(ApplyRejection::Fenced),
        "an anonymous writer is fenced on an attached volume"
    );
    assert_eq!(
        write_with_epoch(&mut fixture, info.id, epoch, 2),
        ApplyOutcome::Applied
    );
    for command in zeroing_commands(info.id, epoch + 1) {
        assert_eq!(
            fixture.apply(&command),
            ApplyOutcome::Rejected(ApplyRejection::Fenced)
        );
    }
    // Re-attach by the same client: a new epoch, the old one is fenced.
    let second = attached_epoch(&attach(&mut fixture, "host-a", false));
    assert!(second > epoch);
    assert_eq!(
        write_with_epoch(&mut fixture, info.id, epoch, 3),
        ApplyOutcome::Rejected(ApplyRejection::Fenced)
    );
    for command in zeroing_commands(info.id, second) {
        assert_eq!(fixture.apply(&command), ApplyOutcome::Applied);
    }
    let reader = fixture.state_machine.reader(info.id).unwrap();
    assert_eq!(read(&reader, 0, 4096), vec![0u8; 4096]);
    assert_eq!(reader.info().attachment.map(|a| a.epoch), Some(second));
}

/// Fencing rules: another client is refused unless it forces, which fences the old epoch.
#[test]
fn another_client_needs_force_and_then_fences_the_old_writer() {
    let mut fixture = Fixture::new();
    let info = fixture.create("disk", 64 * KIB, 4096);
    let old_epoch = attached_epoch(&attach(&mut fixture, "host-a", false));
    assert_eq!(
        attach(&mut fixture, "host-b", false),
        ApplyOutcome::Rejected(ApplyRejection::AttachedByOther)
    );
    assert_eq!(
        fixture
            .state_machine
            .volume_by_name("disk")
            .unwrap()
            .attachment
            .unwrap()
            .client,
        "host-a",
        "a refused attach changes nothing"
    );
    let new_epoch = attached_epoch(&attach(&mut fixture, "host-b", true));
    assert!(new_epoch > old_epoch);
    assert_eq!(
        write_with_epoch(&mut fixture, info.id, old_epoch, 1),
        ApplyOutcome::Rejected(ApplyRejection::Fenced)
    );
    assert_eq!(
        write_with_epoch(&mut fixture, info.id, new_epoch, 2),
        ApplyOutcome::Applied
    );
    assert_eq!(
        attach(&mut fixture, "", false),
        ApplyOutcome::Rejected(ApplyRejection::InvalidCommand)
    );
    assert_eq!(
        fixture.apply(&encode_command(&Command::Attach {
            name: "nope",
            client: "host-a",
            force: true,
            attach_id: None,
        })),
        ApplyOutcome::Rejected(ApplyRejection::NoSuchVolume)
    );
}

/// Fencing rules: Detach succeeds only for the current epoch; afterwards the volume is
/// unattached again (epoch 0 writes, anyone may attach).
#[test]
fn detach_needs_the_current_epoch() {
    let mut fixture = Fixture::new();
    let info = fixture.create("disk", 64 * KIB, 4096);
    let old_epoch = attached_epoch(&attach(&mut fixture, "host-a", false));
    let epoch = attached_epoch(&attach(&mut fixture, "host-a", false));
    let detach = |epoch| {
        encode_command(&Command::Detach {
            name: "disk",
            epoch,
        })
    };
    assert_eq!(
        fixture.apply(&detach(old_epoch)),
        ApplyOutcome::Rejected(ApplyRejection::Fenced)
    );
    match fixture.apply(&detach(epoch)) {
        ApplyOutcome::Detached(detached) => {
            assert_eq!(detached.attachment, None);
            assert_eq!(detached.id, info.id);
        }
        other => panic!("detach returned {other:?}"),
    }
    assert_eq!(
        fixture.apply(&detach(epoch)),
        ApplyOutcome::Rejected(ApplyRejection::Fenced),
        "detaching an unattached volume is fenced"
    );
    assert_eq!(
        fixture.apply(&encode_command(&Command::Detach {
            name: "nope",
            epoch
        })),
        ApplyOutcome::Rejected(ApplyRejection::NoSuchVolume)
    );
    assert_eq!(
        write_with_epoch(&mut fixture, info.id, 0, 1),
        ApplyOutcome::Applied
    );
    assert_eq!(
        write_with_epoch(&mut fixture, info.id, epoch, 1),
        ApplyOutcome::Rejected(ApplyRejection::Fenced)
    );
    attached_epoch(&attach(&mut fixture, "host-b", false));
}

/// The attachment is in the volume row and recorded with its index as a checkpoint, so a
/// restart (and replay of the entries after it) fences exactly as before.
#[test]
fn attachment_survives_restart_and_replay_decides_the_same() {
    let mut fixture = Fixture::new();
    let info = fixture.create("disk", 64 * KIB, 4096);
    let epoch = attached_epoch(&attach(&mut fixture, "host-a", false));
    assert_eq!(fixture.state_machine.durable_applied_index(), epoch);
    let stale = encode_write_command(info.id, 0, 0, &[9u8; 4096]);
    let current = encode_write_command(info.id, epoch, 4096, &[8u8; 4096]);
    assert_eq!(
        fixture.apply(&stale),
        ApplyOutcome::Rejected(ApplyRejection::Fenced)
    );
    assert_eq!(fixture.apply(&current), ApplyOutcome::Applied);
    let mut fixture = fixture.reopen();
    assert_eq!(fixture.state_machine.applied_index(), epoch);
    assert_eq!(
        fixture.state_machine.volumes()[0].attachment,
        Some(Attachment {
            client: "host-a".to_string(),
            epoch,
            attach_id: None,
        })
    );
    // Replay of the two entries after the checkpoint.
    assert_eq!(
        fixture.apply(&stale),
        ApplyOutcome::Rejected(ApplyRejection::Fenced)
    );
    assert_eq!(fixture.apply(&current), ApplyOutcome::Applied);
    let reader = fixture.state_machine.reader(info.id).unwrap();
    assert_eq!(read(&reader, 0, 4096), vec![0u8; 4096]);
    assert_eq!(read(&reader, 4096, 4096), vec![8u8; 4096]);
}

/// Rows written before fencing existed have no `attachment` field: they read as unattached.
#[test]
fn volume_rows_without_attachment_decode_as_unattached() {
    let row = br#"{"id":3,"name":"old","size_bytes":8192,"block_size_bytes":4096}"#;
    let info: VolumeInfo = serde_json::from_slice(row).unwrap();
    assert_eq!(info.attachment, None);
    assert_eq!(info.id, 3);
}

#[test]
fn indexes_must_follow_the_applied_index() {
    let mut fixture = Fixture::new();
    fixture.create("disk", 64 * KIB, 4096);
    assert_eq!(
        fixture.state_machine.apply(1, b"").unwrap(),
        ApplyOutcome::AlreadyApplied
    );
    assert!(matches!(
        fixture.state_machine.apply(5, b""),
        Err(StorageError::ApplyOutOfOrder {
            expected_index: 2,
            index: 5,
            ..
        })
    ));
    let outcomes = fixture
        .state_machine
        .apply_batch(&[(1, b""), (2, b""), (3, b"")])
        .unwrap();
    assert_eq!(
        outcomes,
        vec![
            ApplyOutcome::AlreadyApplied,
            ApplyOutcome::Applied,
            ApplyOutcome::Applied
        ]
    );
    assert_eq!(fixture.state_machine.applied_index(), 3);
}

#[test]
fn trim_punches_holes_and_block_status_reports_them() {
    let mut fixture = Fixture::new();
    let info = fixture.create("disk", 1024 * KIB, 4096);
    fixture.apply(&encode_write_command(
        info.id,
        0,
        0,
        &vec![7u8; 1024 * 1024],
    ));
    fixture.apply(&encode_command(&Command::Trim {
        volume_id: info.id,
        writer_epoch: 0,
        offset: 256 * KIB,
        length: 256 * KIB,
    }));
    // Zeroed in place (NO_HOLE): allocated, but reported as zero.
    fixture.apply(&encode_command(&Command::WriteZeroes {
        volume_id: info.id,
        writer_epoch: 0,
        offset: 768 * KIB,
        length: 128 * KIB,
        may_punch_hole: false,
    }));
    let reader = fixture.state_machine.reader(info.id).unwrap();
    assert_eq!(read(&reader, 256 * KIB, 256 * KIB), vec![0u8; 256 * 1024]);
    let extents = reader.block_status(0, 1024 * KIB).unwrap();
    // (hole, zero) of the byte at `offset` according to the extents.
    let flags_at = |offset: u64| {
        let mut start = 0;
        for extent in &extents {
            if offset < start + extent.length_bytes {
                return (extent.hole, extent.zero);
            }
            start += extent.length_bytes;
        }
        panic!("offset {offset} not covered by {extents:?}");
    };
    assert_eq!(
        extents
            .iter()
            .map(|extent| extent.length_bytes)
            .sum::<u64>(),
        1024 * KIB
    );
    for offset in (0..256 * KIB).step_by(4096) {
        assert_eq!(flags_at(offset), (false, false), "offset {offset}");
    }
    for offset in (256 * KIB..512 * KIB).step_by(4096) {
        assert_eq!(flags_at(offset), (true, true), "offset {offset}");
    }
    // Zeroed in place: ext4 keeps the range allocated as unwritten extents, which
    // SEEK_DATA may report as a hole; either way it must read as zero.
    for offset in (768 * KIB..896 * KIB).step_by(4096) {
        assert!(flags_at(offset).1, "offset {offset}");
    }
    for offset in (896 * KIB..1024 * KIB).step_by(4096) {
        assert_eq!(flags_at(offset), (false, false), "offset {offset}");
    }
    // A sub-range starting inside the hole.
    assert_eq!(
        reader.block_status(300 * KIB, 8 * KIB).unwrap(),
        vec![Extent {
            length_bytes: 8 * KIB,
            hole: true,
            zero: true
        }]
    );
}

#[test]
fn unaligned_zeroing_keeps_the_edge_blocks_verifiable() {
    let mut fixture = Fixture::new();
    let info = fixture.create("disk", 64 * KIB, 4096);
    fixture.apply(&encode_write_command(info.id, 0, 0, &vec![5u8; 64 * 1024]));
    fixture.apply(&encode_command(&Command::Trim {
        volume_id: info.id,
        writer_epoch: 0,
        offset: 1000,
        length: 10_000,
    }));
    let reader = fixture.state_machine.reader(info.id).unwrap();
    let all = read(&reader, 0, 64 * KIB);
    assert!(all[..1000].iter().all(|&byte| byte == 5));
    assert!(all[1000..11_000].iter().all(|&byte| byte == 0));
    assert!(all[11_000..].iter().all(|&byte| byte == 5));
}

#[test]
fn corruption_behind_our_back_is_a_checksum_mismatch() {
    let mut fixture = Fixture::new();
    let info = fixture.create("disk", 64 * KIB, 4096);
    fixture.apply(&encode_write_command(info.id, 0, 0, &vec![1u8; 8192]));
    fixture.state_machine.make_durable().unwrap();
    // Flip a byte in block 1, and write into block 5, which has no checksum (a hole).
    let image = ImageFile::open(&fixture.image_path(info.id)).unwrap();
    image.write_all_at(4096 + 17, &[2]).unwrap();
    image.write_all_at(5 * 4096, &[9]).unwrap();
    let reader = fixture.state_machine.reader(info.id).unwrap();
    let mut buf = vec![0u8; 4096];
    reader.read(0, &mut buf).unwrap();
    assert!(matches!(
        reader.read(4000, &mut buf),
        Err(StorageError::ChecksumMismatch {
            volume_id: 1,
            block_index: 1,
            recorded_crc32c: Some(_),
            ..
        })
    ));
    assert!(matches!(
        reader.read(5 * 4096 + 100, &mut [0u8; 10]),
        Err(StorageError::ChecksumMismatch {
            block_index: 5,
            recorded_crc32c: None,
            ..
        })
    ));
}

#[test]
fn delete_removes_row_checksums_and_image() {
    let mut fixture = Fixture::new();
    let info = fixture.create("disk", 64 * KIB, 4096);
    fixture.apply(&encode_write_command(info.id, 0, 0, &vec![1u8; 8192]));
    let reader = fixture.state_machine.reader(info.id).unwrap();
    assert_eq!(
        fixture.apply(&encode_command(&Command::DeleteVolume { name: "disk" })),
        ApplyOutcome::VolumeDeleted(info.clone())
    );
    assert!(!fixture.image_path(info.id).exists());
    assert!(matches!(
        reader.read(0, &mut [0u8; 4096]),
        Err(StorageError::VolumeDeleted { volume_id: 1 })
    ));
    assert!(fixture.state_machine.reader(info.id).is_none());
    assert_eq!(fixture.state_machine.durable_applied_index(), 3);
    let db = fixture.state_machine.db.clone();
    let checksums = column_family(&db, keys::CF_BLOCK_CHECKSUMS).unwrap();
    assert!(db
        .get_cf(checksums, keys::block_checksum_key(1, info.id, 0))
        .unwrap()
        .is_none());
    // Every handle on the database must go before it can be opened again.
    drop((reader, db));
    let fixture = fixture.reopen();
    assert!(fixture.state_machine.volumes().is_empty());
}

#[test]
fn reopen_keeps_durable_state_and_removes_orphan_images() {
    let mut fixture = Fixture::new();
    let info = fixture.create("disk", 64 * KIB, 4096);
    fixture.apply(&encode_write_command(info.id, 0, 4096, &[3u8; 4096]));
    assert_eq!(fixture.state_machine.make_durable().unwrap(), 2);
    fixture.apply(&encode_write_command(info.id, 0, 0, &[4u8; 100]));
    // An orphan left by a create interrupted before its row was written.
    let orphan = fixture.image_path(77);
    std::fs::write(&orphan, b"junk").unwrap();
    // A file that is not ours stays.
    let foreign = fixture.directory.path().join("images").join("notes.txt");
    std::fs::write(&foreign, b"keep").unwrap();
    let mut fixture = fixture.reopen();
    assert_eq!(fixture.state_machine.durable_applied_index(), 2);
    assert_eq!(fixture.state_machine.applied_index(), 2);
    assert!(!orphan.exists());
    assert!(foreign.exists());
    // Replay of entry 3 (not covered by the checkpoint) is idempotent.
    fixture.apply(&encode_write_command(info.id, 0, 0, &[4u8; 100]));
    let reader = fixture.state_machine.reader(info.id).unwrap();
    assert_eq!(read(&reader, 0, 100), vec![4u8; 100]);
    assert_eq!(read(&reader, 4096, 4096), vec![3u8; 4096]);
}

/// Readers on other threads run during apply: they must never see a checksum mismatch, and
/// every 4 KiB block they read must be one whole version (apply writes whole blocks filled
/// with one byte value).
#[test]
fn concurrent_reads_never_see_torn_blocks_or_false_mismatches() {
    let mut fixture = Fixture::new();
    let info = fixture.create("disk", 256 * KIB, 4096);
    let reader = fixture.state_machine.reader(info.id).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let reads_total = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let threads: Vec<_> = (0..2u64)
        .map(|thread| {
            let reader = reader.clone();
            let stop = stop.clone();
            let reads_total = reads_total.clone();
            std::thread::spawn(move || {
                let mut reads = 0u64;
                let mut buf = vec![0u8; 3 * 4096];
                while !stop.load(Ordering::Relaxed) {
                    let offset = ((reads * 7 + thread * 13) % 60) * 4096;
                    reader.read(offset, &mut buf).unwrap();
                    for block in buf.chunks_exact(4096) {
                        assert!(block.iter().all(|&byte| byte == block[0]), "torn block");
                    }
                    reads += 1;
                    reads_total.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    // Keep applying until the readers have overlapped with plenty of applies.
    let mut round = 0u64;
    while round < 300 || reads_total.load(Ordering::Relaxed) < 200 {
        let offset = (round * 5 % 62) * 4096;
        let value = (round % 250) as u8 + 1;
        if round % 7 == 0 {
            fixture.apply(&encode_command(&Command::Trim {
                volume_id: info.id,
                writer_epoch: 0,
                offset,
                length: 8192,
            }));
        } else {
            fixture.apply(&encode_write_command(
                info.id,
                0,
                offset,
                &vec![value; 8192],
            ));
        }
        round += 1;
    }
    stop.store(true, Ordering::Relaxed);
    for thread in threads {
        // A panic in a reader (mismatch, torn block) fails the test here.
        thread.join().unwrap();
    }
}
