//! Data sets: the CIFAR-10 binary reader's checks, the image-folder reader, and the
//! CIFAR-10 archive extraction and download (from archives built here).

use crate::common::{dir_snapshot, ferrovit, mkfifo, png_header, temp_dir, within_20s};
use ferrovit::data::{cifar10, default_data_dir, Dataset};
use std::io::Write;
use std::path::Path;

#[test]
fn cifar_reader_reads_the_digits_and_names_bad_records() {
    let (train, test) = Dataset::cifar_dir(&default_data_dir()).unwrap();
    assert_eq!((train.len(), test.len()), (1437, 360));
    assert_eq!(train.images.len(), 1437 * 3072);
    assert_eq!(train.classes.len(), 10);
    assert!(train.labels.iter().all(|&l| l < 10));

    let dir = temp_dir("cifar-bad");
    std::fs::write(dir.join("batches.meta.txt"), "x\ny\nz\n").unwrap();
    let mut recs = vec![0u8; 3073 * 4];
    recs[3 * 3073] = 3;
    let f = dir.join("data_batch_1.bin");
    std::fs::write(&f, &recs).unwrap();
    std::fs::write(dir.join("test_batch.bin"), vec![0u8; 3073]).unwrap();
    let e = Dataset::open(&dir).unwrap_err().to_string();
    assert!(
        e.contains("data_batch_1.bin") && e.contains("record 3: label 3"),
        "{e}"
    );
    std::fs::write(&f, &recs[..3073 * 2 + 1]).unwrap();
    let e = Dataset::open(&dir).unwrap_err().to_string();
    assert!(e.contains("data_batch_1.bin: size 6147"), "{e}");
    std::fs::remove_file(dir.join("test_batch.bin")).unwrap();
    std::fs::write(&f, &recs[..3073]).unwrap();
    let e = Dataset::open(&dir).unwrap_err().to_string();
    assert!(e.contains("test_batch.bin"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Writes an RGB image whose pixel (x, y) is (x, y, 100 + class).
fn write_image(path: &Path, w: u32, h: u32, class: u8) {
    let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, 100 + class]));
    img.save(path).unwrap();
}

#[test]
fn image_folder_reads_classes_resizes_and_rejects_bad_files() {
    let dir = temp_dir("folder");
    for split in ["train", "test"] {
        for (c, name) in ["cat", "dog"].iter().enumerate() {
            let d = dir.join(split).join(name);
            std::fs::create_dir_all(&d).unwrap();
            write_image(&d.join("a.png"), 32, 32, c as u8);
            write_image(&d.join("b.jpg"), 64, 48, c as u8);
            std::fs::write(d.join("notes.txt"), "ignored").unwrap();
            std::fs::write(d.join(".hidden.png"), "ignored").unwrap();
        }
    }
    let (train, test) = Dataset::open(&dir).unwrap();
    assert_eq!(train.classes, ["cat", "dog"]);
    assert_eq!((train.len(), test.len()), (4, 4));
    assert_eq!(train.labels, [0, 0, 1, 1]);
    // a.png is 32 × 32: read exactly; planar RGB
    let a = &train.images[..3072];
    assert_eq!((a[5], a[1024 + 7 * 32], a[2048]), (5, 7, 100));
    // b.jpg (64 × 48) → resized to 43 × 32 and centre-cropped: still smooth ramps
    let b = &train.images[3072..2 * 3072];
    assert!(b[1024 + 31 * 32] > b[1024], "vertical ramp kept");
    assert!((b[2048 + 500] as i32 - 100).abs() <= 3, "JPEG blue ≈ 100");

    // a class in test/ that train/ lacks
    std::fs::create_dir_all(dir.join("test/bird")).unwrap();
    write_image(&dir.join("test/bird/x.png"), 32, 32, 2);
    let e = Dataset::open(&dir).unwrap_err().to_string();
    assert!(e.contains("class `bird`"), "{e}");
    std::fs::remove_dir_all(dir.join("test/bird")).unwrap();
    // an unreadable image names the file
    std::fs::write(dir.join("train/dog/c.jpeg"), b"\xff\xd8 truncated jpeg").unwrap();
    let e = Dataset::open(&dir).unwrap_err().to_string();
    assert!(
        e.contains("c.jpeg") && e.contains("cannot decode image"),
        "{e}"
    );
    // neither format
    let e = Dataset::open(&dir.join("train")).unwrap_err().to_string();
    assert!(e.contains("neither CIFAR-10"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A gzip'd tar with the digits data under `cifar-10-batches-bin/`, like the real one.
fn digits_archive(path: &Path, skip: Option<&str>) {
    let f = std::fs::File::create(path).unwrap();
    let gz = flate2::write::GzEncoder::new(f, flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    let src = default_data_dir();
    for name in ["batches.meta.txt", "data_batch_1.bin", "test_batch.bin"] {
        if Some(name) == skip {
            continue;
        }
        tar.append_path_with_name(src.join(name), format!("cifar-10-batches-bin/{name}"))
            .unwrap();
    }
    // The real archive has five training batches; the digits data has one, reused.
    for i in 2..=5 {
        let name = format!("data_batch_{i}.bin");
        if Some(name.as_str()) == skip {
            continue;
        }
        tar.append_path_with_name(
            src.join("data_batch_1.bin"),
            format!("cifar-10-batches-bin/{name}"),
        )
        .unwrap();
    }
    tar.into_inner().unwrap().finish().unwrap();
}

#[test]
fn extract_archive_then_train_on_it() {
    let dir = temp_dir("archive");
    let archive = dir.join("cifar-10-binary.tar.gz");
    digits_archive(&archive, None);
    let data = dir.join("cifar10");
    let (ok, out, err) = ferrovit(&[
        "data",
        "cifar10",
        "--archive",
        archive.to_str().unwrap(),
        "--dir",
        data.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("7185 train / 360 test"), "{out}");
    let (ok, out, err) = ferrovit(&[
        "train",
        "--data",
        data.to_str().unwrap(),
        "--epochs",
        "1",
        "--dim",
        "16",
        "--depth",
        "1",
        "--heads",
        "2",
        "--mlp-dim",
        "16",
        "--batch-size",
        "256",
        "--out",
        dir.join("out").to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("final test accuracy"), "{out}");

    // a truncated archive: the gzip check catches it; nothing half-written is left
    let bytes = std::fs::read(&archive).unwrap();
    let cut = dir.join("cut.tar.gz");
    std::fs::write(&cut, &bytes[..bytes.len() - 5000]).unwrap();
    let e = cifar10::extract(&cut, &dir.join("cut"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("cut.tar.gz"), "{e}");
    assert!(!dir.join("cut").exists(), "nothing left behind");
    // an archive missing a member
    let partial = dir.join("partial.tar.gz");
    digits_archive(&partial, Some("test_batch.bin"));
    let e = cifar10::extract(&partial, &dir.join("partial"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("missing test_batch.bin"), "{e}");
    // not an archive at all
    let junk = dir.join("junk.tar.gz");
    std::fs::write(&junk, b"hello").unwrap();
    let (ok, _, err) = ferrovit(&[
        "data",
        "cifar10",
        "--archive",
        junk.to_str().unwrap(),
        "--dir",
        dir.join("j").to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("junk.tar.gz"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Serves one HTTP response claiming `claimed` bytes and sending `body`.
fn serve_once(body: Vec<u8>, claimed: usize) -> (String, std::thread::JoinHandle<()>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let mut req = [0u8; 4096];
        let _ = std::io::Read::read(&mut conn, &mut req);
        let head = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {claimed}\r\nContent-Type: application/gzip\r\nConnection: close\r\n\r\n"
        );
        let _ = conn.write_all(head.as_bytes());
        let _ = conn.write_all(&body);
    });
    (
        format!("http://127.0.0.1:{port}/cifar-10-binary.tar.gz"),
        server,
    )
}

#[test]
fn download_from_a_local_server() {
    let dir = temp_dir("download");
    let archive = dir.join("served.tar.gz");
    digits_archive(&archive, None);
    let body = std::fs::read(&archive).unwrap();
    let data = dir.join("cifar10");
    let download = |url: &str| {
        ferrovit(&[
            "data",
            "cifar10",
            "--download",
            data.to_str().unwrap(),
            "--url",
            url,
        ])
    };

    // the connection drops half-way: a clear error, no partial file left
    let (url, server) = serve_once(body[..body.len() / 2].to_vec(), body.len());
    let (ok, _, err) = download(&url);
    server.join().unwrap();
    assert!(!ok && err.contains(&url), "{err}");
    assert!(!data.join("cifar-10-binary.tar.gz.part").exists());
    assert!(!data.join("cifar-10-binary.tar.gz").exists());

    let (url, server) = serve_once(body.clone(), body.len());
    let (ok, out, err) = download(&url);
    server.join().unwrap();
    assert!(ok, "{err}");
    assert!(out.contains("7185 train / 360 test"), "{out}");
    assert!(data.join("cifar-10-binary.tar.gz").is_file());
    assert!(Dataset::open(&data).is_ok());

    // no server there: one clear error naming the URL
    let (ok, _, err) = download("http://127.0.0.1:9/none.tar.gz");
    assert!(
        !ok && err.contains("127.0.0.1:9/none.tar.gz") && err.contains("download failed"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// One tar entry as written: its header's type, path, declared size and link target,
/// then the bytes after it (which need not match the declared size).
struct Member {
    kind: tar::EntryType,
    path: String,
    size: u64,
    link: Option<&'static str>,
    data: Vec<u8>,
}

/// A regular file `cifar-10-batches-bin/NAME`.
fn member(name: &str, data: Vec<u8>) -> Member {
    Member {
        kind: tar::EntryType::Regular,
        path: format!("cifar-10-batches-bin/{name}"),
        size: data.len() as u64,
        link: None,
        data,
    }
}

/// An entry `cifar-10-batches-bin/NAME` of another kind, with no data.
fn special(name: &str, kind: tar::EntryType, link: Option<&'static str>) -> Member {
    Member {
        kind,
        path: format!("cifar-10-batches-bin/{name}"),
        size: 0,
        link,
        data: Vec::new(),
    }
}

/// The members of the digits archive ([`digits_archive`]), in its order.
fn digits_members() -> Vec<Member> {
    let src = default_data_dir();
    let read = |name: &str| std::fs::read(src.join(name)).unwrap();
    let mut m = vec![
        member("batches.meta.txt", read("batches.meta.txt")),
        member("data_batch_1.bin", read("data_batch_1.bin")),
        member("test_batch.bin", read("test_batch.bin")),
    ];
    for i in 2..=5 {
        m.push(member(
            &format!("data_batch_{i}.bin"),
            read("data_batch_1.bin"),
        ));
    }
    m
}

/// Writes `members` as a gzip'd tar, headers exactly as given, then `zeros` MiB of
/// zero bytes after the end-of-archive blocks (inside the gzip stream).
fn write_tar_gz(path: &Path, members: &[Member], zeros: usize) {
    let f = std::fs::File::create(path).unwrap();
    let mut gz = flate2::write::GzEncoder::new(f, flate2::Compression::fast());
    for m in members {
        let mut h = tar::Header::new_gnu();
        // raw, so `..` can be written too
        h.as_old_mut().name[..m.path.len()].copy_from_slice(m.path.as_bytes());
        h.set_entry_type(m.kind);
        h.set_size(m.size);
        h.set_mode(0o644);
        if let Some(link) = m.link {
            h.set_link_name(link).unwrap();
        }
        h.set_cksum();
        gz.write_all(h.as_bytes()).unwrap();
        gz.write_all(&m.data).unwrap();
        gz.write_all(&vec![0; (512 - m.data.len() % 512) % 512])
            .unwrap();
    }
    gz.write_all(&[0; 1024]).unwrap();
    let mib = vec![0u8; 1 << 20];
    for _ in 0..zeros {
        gz.write_all(&mib).unwrap();
    }
    gz.finish().unwrap();
}

/// Every way an archive can be bad leaves a complete data set in `--dir` untouched
/// (no file replaced, nothing added, no staging directory left) and creates no `--dir`
/// that was not there; members are refused from their headers before being written.
#[test]
fn a_bad_archive_leaves_the_target_directory_as_it_was() {
    use tar::EntryType;
    let dir = temp_dir("bad-archives");
    let keep = dir.join("keep");
    let good = dir.join("good.tar.gz");
    write_tar_gz(&good, &digits_members(), 0);
    assert_eq!(cifar10::extract(&good, &keep).unwrap(), (7185, 360));
    let before = dir_snapshot(&keep);
    assert_eq!(before.len(), 7);

    let with = |change: &dyn Fn(&mut Vec<Member>)| {
        let mut m = digits_members();
        change(&mut m);
        m
    };
    let find = |m: &mut Vec<Member>, name: &str| {
        m.iter()
            .position(|x| x.path.ends_with(name))
            .expect("member")
    };
    let cases: Vec<(&str, Vec<Member>, &str)> = vec![
        (
            "label",
            with(&|m| {
                let i = find(m, "test_batch.bin");
                m[i].data[3073] = 250;
            }),
            "member cifar-10-batches-bin/test_batch.bin: record 1: label 250 is out of range",
        ),
        (
            "duplicate",
            with(&|m| m.push(member("test_batch.bin", vec![0; 3073]))),
            "member cifar-10-batches-bin/test_batch.bin appears twice",
        ),
        (
            "wrong-size",
            with(&|m| {
                let i = find(m, "data_batch_2.bin");
                m[i].data.truncate(3073 * 7 + 5);
                m[i].size = m[i].data.len() as u64;
            }),
            "member cifar-10-batches-bin/data_batch_2.bin: size 21516 is not a positive multiple",
        ),
        (
            "symlink",
            with(&|m| {
                let i = find(m, "test_batch.bin");
                m[i] = special("test_batch.bin", EntryType::Symlink, Some("/etc/passwd"));
            }),
            "test_batch.bin is a symbolic link, not a regular file",
        ),
        (
            "hardlink",
            with(&|m| {
                let i = find(m, "test_batch.bin");
                m[i] = special("test_batch.bin", EntryType::Link, Some("/etc/passwd"));
            }),
            "test_batch.bin is a hard link, not a regular file",
        ),
        (
            "fifo",
            with(&|m| {
                let i = find(m, "test_batch.bin");
                m[i] = special("test_batch.bin", EntryType::Fifo, None);
            }),
            "test_batch.bin is a named pipe (FIFO), not a regular file",
        ),
        (
            "directory",
            with(&|m| {
                let i = find(m, "test_batch.bin");
                m[i] = special("test_batch.bin", EntryType::Directory, None);
            }),
            "test_batch.bin is a directory, not a regular file",
        ),
        (
            "unknown",
            with(&|m| m.insert(1, member("notes.txt", b"hello".to_vec()))),
            "unexpected member cifar-10-batches-bin/notes.txt (5 bytes)",
        ),
        (
            "traversal",
            with(&|m| {
                let i = find(m, "data_batch_1.bin");
                m[i].path = "../data_batch_1.bin".into();
            }),
            "unexpected member ../data_batch_1.bin",
        ),
        (
            // a header claiming 3 GiB: refused before a byte of it is written
            "huge",
            with(&|m| {
                let i = find(m, "data_batch_1.bin");
                m[i].size = 3 << 30;
                m[i].data.truncate(1 << 20);
            }),
            "data_batch_1.bin declares 3221225472 bytes, over the 30730000 bytes",
        ),
        (
            "big-meta",
            with(&|m| m[0] = member("batches.meta.txt", vec![b'a'; 5000])),
            "batches.meta.txt declares 5000 bytes, over the 4096 bytes",
        ),
        (
            "missing",
            with(&|m| {
                let i = find(m, "data_batch_3.bin");
                m.remove(i);
            }),
            "missing data_batch_3.bin",
        ),
    ];
    for (name, members, want) in cases {
        let archive = dir.join(format!("{name}.tar.gz"));
        write_tar_gz(&archive, &members, 0);
        let e = cifar10::extract(&archive, &keep).unwrap_err().to_string();
        let shown = format!("{name}.tar.gz");
        assert!(e.contains(&shown) && e.contains(want), "{name}: {e}");
        assert!(dir_snapshot(&keep) == before, "{name}: --dir changed");
        let fresh = dir.join("fresh");
        let e = cifar10::extract(&archive, &fresh.join("sub")).unwrap_err();
        assert!(e.to_string().contains(want), "{name}: {e}");
        assert!(!fresh.exists(), "{name}: an empty --dir was left behind");
    }

    // a stream that decompresses to more than any CIFAR-10 archive can hold
    let bomb = dir.join("bomb.tar.gz");
    write_tar_gz(&bomb, &digits_members(), 200);
    let e = cifar10::extract(&bomb, &keep).unwrap_err().to_string();
    let cap = cifar10::MAX_TAR_BYTES;
    assert!(
        e.contains("bomb.tar.gz") && e.contains(&format!("decompresses to over {cap} bytes")),
        "{e}"
    );
    assert!(dir_snapshot(&keep) == before, "bomb: --dir changed");
    // bytes after the gzip stream
    let mut bytes = std::fs::read(&good).unwrap();
    bytes.extend_from_slice(b"GARBAGE");
    let trailing = dir.join("trailing.tar.gz");
    std::fs::write(&trailing, bytes).unwrap();
    let e = cifar10::extract(&trailing, &keep).unwrap_err().to_string();
    assert!(
        e.contains("trailing.tar.gz: data after the end of the gzip stream"),
        "{e}"
    );
    assert!(dir_snapshot(&keep) == before, "trailing: --dir changed");
    // zero padding after it (a tape-blocked archive) is not data
    let mut bytes = std::fs::read(&good).unwrap();
    bytes.resize(bytes.len() + 10240, 0);
    let padded = dir.join("padded.tar.gz");
    std::fs::write(&padded, bytes).unwrap();
    let fresh = dir.join("from-padded");
    cifar10::extract(&padded, &fresh).unwrap();
    assert!(fresh.join("test_batch.bin").is_file());

    // a good archive again replaces the files, and leaves others alone
    std::fs::write(keep.join("mine.txt"), "mine").unwrap();
    std::fs::write(keep.join("test_batch.bin"), vec![0u8; 3073]).unwrap();
    assert_eq!(cifar10::extract(&good, &keep).unwrap(), (7185, 360));
    let mut after = dir_snapshot(&keep);
    assert_eq!(
        after.remove(Path::new("mine.txt")),
        Some(Some(b"mine".to_vec()))
    );
    assert!(after == before);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `--archive` must be a regular file (a named pipe would hang the read); nothing is
/// created when it is not.
#[test]
fn archives_that_are_not_regular_files_are_refused_at_once() {
    let dir = temp_dir("archive-kinds");
    let fifo = dir.join("fifo.tar.gz");
    mkfifo(&fifo);
    let out = dir.join("out");
    let (f, o) = (fifo.clone(), out.clone());
    let e = within_20s(move || cifar10::extract(&f, &o).unwrap_err().to_string());
    assert!(e.contains("fifo.tar.gz") && e.contains("named pipe"), "{e}");
    assert!(!out.exists());
    let (ok, _, err) = ferrovit(&[
        "data",
        "cifar10",
        "--archive",
        dir.to_str().unwrap(),
        "--dir",
        out.to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("is a directory"), "{err}");
    assert!(!out.exists(), "no empty --dir left behind");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A server that sends `bytes` (then, with `endless`, zeros for as long as the client
/// reads) and holds the connection open until told to go (at most 30 s).
fn serve_and_hold(
    bytes: Vec<u8>,
    endless: bool,
) -> (
    String,
    std::sync::mpsc::Sender<()>,
    std::thread::JoinHandle<()>,
) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let server = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let mut req = [0u8; 4096];
        let _ = std::io::Read::read(&mut conn, &mut req);
        let _ = conn.write_all(&bytes);
        let zeros = vec![0u8; 1 << 16];
        while endless && rx.try_recv().is_err() && conn.write_all(&zeros).is_ok() {}
        let _ = rx.recv_timeout(std::time::Duration::from_secs(30));
    });
    (format!("http://127.0.0.1:{port}/c.tar.gz"), tx, server)
}

/// `--download` gives up on a silent or stalled server after `--timeout`, refuses a
/// body larger than any CIFAR-10 archive from its `Content-Length`, and leaves no
/// `.part` file and no directory it created.
#[test]
fn downloads_time_out_and_refuse_oversized_bodies() {
    let dir = temp_dir("download-limits");
    let data = dir.join("new");
    let download = |url: &str| {
        let t = std::time::Instant::now();
        let (ok, _, err) = ferrovit(&[
            "data",
            "cifar10",
            "--download",
            data.to_str().unwrap(),
            "--url",
            url,
            "--timeout",
            "1",
        ]);
        assert!(!ok, "{err}");
        assert!(err.contains(url), "{err}");
        assert!(t.elapsed().as_secs() < 15, "took {:?}: {err}", t.elapsed());
        assert!(!data.exists(), "nothing left behind: {err}");
        err
    };
    // a link at the .part name is refused before anything is fetched or written
    let linked = dir.join("linked");
    std::fs::create_dir(&linked).unwrap();
    let victim = dir.join("victim.txt");
    std::fs::write(&victim, "precious").unwrap();
    let part = linked.join("cifar-10-binary.tar.gz.part");
    std::os::unix::fs::symlink(&victim, &part).unwrap();
    let (ok, _, err) = ferrovit(&[
        "data",
        "cifar10",
        "--download",
        linked.to_str().unwrap(),
        "--url",
        "http://127.0.0.1:9/x.tar.gz",
    ]);
    assert!(!ok && err.contains("symbolic link"), "{err}");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
    assert!(std::fs::symlink_metadata(&part)
        .unwrap()
        .file_type()
        .is_symlink());
    // a server sending `head` (then zeros forever when `endless`) is refused with an
    // error that says each of `says`
    let refused = |head: &[u8], endless: bool, says: &[&str]| {
        let (url, done, server) = serve_and_hold(head.to_vec(), endless);
        let err = download(&url);
        assert!(says.iter().all(|s| err.contains(s)), "{says:?}: {err}");
        let _ = done.send(());
        server.join().unwrap();
    };
    // accepts, reads the request, never answers
    refused(b"", false, &["download failed", "timeout"]);
    // stalls after 3 bytes of the body
    refused(
        b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\nabc",
        false,
        &["download interrupted after 3 bytes", "timeout"],
    );
    // announces 100 TB and streams zeros
    let limit = cifar10::MAX_ARCHIVE_BYTES;
    refused(
        b"HTTP/1.1 200 OK\r\nContent-Length: 100000000000000\r\n\r\n",
        true,
        &[&format!(
            "announces 100000000000000 bytes, over the {limit}-byte limit"
        )],
    );
    // a body that is no CIFAR-10 archive: refused, nothing kept
    refused(
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
        false,
        &["not a valid CIFAR-10 binary archive"],
    );
    // the timeout is checked
    let (ok, _, err) = ferrovit(&["data", "cifar10", "--download", "x", "--timeout", "0"]);
    assert!(!ok && err.contains("--timeout 0"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn image_sizes_are_checked_from_the_header_before_decoding() {
    use ferrovit::data::folder::load_image;
    let dir = temp_dir("image-sizes");
    // real images: too thin (before: resized to 128,000 × 32, then cropped) and fine
    write_image(&dir.join("thin.png"), 4000, 1, 0);
    write_image(&dir.join("wide.png"), 1024, 32, 0);
    assert!(load_image(&dir.join("wide.png")).is_ok(), "32:1 is allowed");
    let e = load_image(&dir.join("thin.png")).unwrap_err().to_string();
    assert!(
        e.contains("thin.png") && e.contains("4000 × 1 pixels") && e.contains("32 times"),
        "{e}"
    );
    // headers claiming sizes no decoder or resize buffer should be asked for
    for (w, h, why) in [
        (10_000_000, 1, "over 16384 pixels"),
        (3_000_000, 1, "over 16384 pixels"),
        (16_384, 16_384, "over 67108864 pixels"),
        (100_000, 100_000, "over 16384 pixels"),
        (2_147_483_647, 2_147_483_647, "over 16384 pixels"),
    ] {
        let p = dir.join(format!("claims-{w}x{h}.png"));
        std::fs::write(&p, png_header(w, h)).unwrap();
        let e = load_image(&p).unwrap_err().to_string();
        let size = format!("{w} × {h} pixels");
        assert!(
            e.contains(&format!("claims-{w}x{h}.png")) && e.contains(&size) && e.contains(why),
            "{e}"
        );
    }
    // the same check in an image folder
    for split in ["train", "test"] {
        std::fs::create_dir_all(dir.join(split).join("a")).unwrap();
        write_image(&dir.join(split).join("a/ok.png"), 32, 32, 0);
    }
    std::fs::write(dir.join("train/a/huge.png"), png_header(10_000_000, 1)).unwrap();
    let e = Dataset::open(&dir).unwrap_err().to_string();
    assert!(e.contains("huge.png") && e.contains("10000000 × 1"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn pipes_and_devices_are_refused_at_once() {
    let dir = temp_dir("fifo");
    // CIFAR-10 binary: a training file that is a named pipe
    let cifar = dir.join("cifar");
    std::fs::create_dir_all(&cifar).unwrap();
    std::fs::write(cifar.join("batches.meta.txt"), "a\nb\n").unwrap();
    std::fs::write(cifar.join("test_batch.bin"), vec![0u8; 3073]).unwrap();
    // opening the data set names `file` as a named pipe, at once
    let refused_as_pipe = |file: &str| {
        let c = cifar.clone();
        let e = within_20s(move || Dataset::open(&c).unwrap_err().to_string());
        assert!(e.contains(file) && e.contains("named pipe (FIFO)"), "{e}");
    };
    mkfifo(&cifar.join("data_batch_1.bin"));
    refused_as_pipe("data_batch_1.bin");
    // the class names file is a named pipe: said so, not "no batches.meta.txt"
    std::fs::remove_file(cifar.join("batches.meta.txt")).unwrap();
    mkfifo(&cifar.join("batches.meta.txt"));
    refused_as_pipe("batches.meta.txt");
    std::fs::remove_file(cifar.join("batches.meta.txt")).unwrap();
    std::fs::write(cifar.join("batches.meta.txt"), "a\nb\n").unwrap();
    // a symbolic link is followed, but must end at a regular file
    std::fs::remove_file(cifar.join("data_batch_1.bin")).unwrap();
    std::fs::write(cifar.join("data_batch_1.bin"), vec![1u8; 3073]).unwrap();
    std::fs::remove_file(cifar.join("test_batch.bin")).unwrap();
    std::os::unix::fs::symlink("/dev/null", cifar.join("test_batch.bin")).unwrap();
    let e = Dataset::open(&cifar).unwrap_err().to_string();
    assert!(e.contains("test_batch.bin: is a device"), "{e}");
    std::fs::remove_file(cifar.join("test_batch.bin")).unwrap();
    std::os::unix::fs::symlink(cifar.join("data_batch_1.bin"), cifar.join("test_batch.bin"))
        .unwrap();
    assert!(
        Dataset::open(&cifar).is_ok(),
        "a link to a regular file is fine"
    );
    // an image folder: an "image" that is a named pipe
    for split in ["train", "test"] {
        std::fs::create_dir_all(dir.join("img").join(split).join("a")).unwrap();
        write_image(&dir.join("img").join(split).join("a/ok.png"), 32, 32, 0);
    }
    mkfifo(&dir.join("img/test/a/pipe.png"));
    let img = dir.join("img");
    let e = within_20s(move || Dataset::open(&img).unwrap_err().to_string());
    assert!(e.contains("pipe.png") && e.contains("named pipe"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn duplicate_class_names_are_an_error() {
    let dir = temp_dir("dup-classes");
    std::fs::write(dir.join("batches.meta.txt"), "cat\ndog\ncat\n").unwrap();
    std::fs::write(dir.join("data_batch_1.bin"), vec![0u8; 3073]).unwrap();
    std::fs::write(dir.join("test_batch.bin"), vec![0u8; 3073]).unwrap();
    let e = Dataset::open(&dir).unwrap_err().to_string();
    assert!(
        e.contains("batches.meta.txt") && e.contains("\"cat\" appears twice"),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `--image-size`: an image folder is decoded at the size (shorter side, centre crop),
/// CIFAR-10 binary data is resized from 32 bilinearly, batches have the size, the crop
/// padding scales (4 at 32 → 6 at 48), AutoAugment runs at it; `--mean/--std` are what
/// batches and the device's raw images are normalised with.
#[test]
fn data_sets_at_another_image_size_and_normalisation() {
    use ferrovit::data::{folder, Augment, Normalize};
    let dir = temp_dir("folder-48");
    for split in ["train", "test"] {
        let d = dir.join(split).join("only");
        std::fs::create_dir_all(&d).unwrap();
        write_image(&d.join("a.png"), 96, 64, 0);
    }
    let (train, _) = Dataset::open_at(&dir, 48).unwrap();
    assert_eq!((train.side, train.images.len()), (48, 3 * 48 * 48));
    // 96 × 64 → 72 × 48, cropped at x 12..60: the red channel (x) is the source column
    // scaled by 4/3, so the crop's middle column shows source x ≈ (12 + 24) × 4/3 = 48
    let mid = train.images[24 * 48 + 24] as i32;
    assert!((mid - 48).abs() <= 1, "centre pixel red {mid}");
    assert_eq!(train.images[2 * 48 * 48], 100, "blue is the class's");
    let e = Dataset::open_at(&dir, 2000).unwrap_err().to_string();
    assert!(e.contains("image size 2000"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();

    let (digits, _) = Dataset::cifar_dir(&default_data_dir()).unwrap();
    let big = digits.clone().resized(48);
    assert_eq!((big.side, big.len()), (48, digits.len()));
    assert_eq!(
        big.images[..3 * 48 * 48],
        folder::resize_planar(&digits.images[..3072], 32, 48)[..],
        "CIFAR-10 records resized as image folders are"
    );
    let (b, labels) = big.batch(&[0, 1, 2], None).unwrap();
    assert_eq!(
        (b.dims(), labels),
        (&[3, 3, 48, 48][..], digits.labels_of(&[0, 1, 2]).unwrap())
    );

    // the crop padding scales with the side: 13 × 13 offsets at 48 (padding 6)
    let crop = Augment::parse("crop").unwrap();
    assert_eq!(crop.for_side(32), crop);
    assert_eq!(crop.for_side(48).crop_padding, 6);
    assert_eq!(crop.for_side(64).crop_padding, 8);
    let (raw, _) = big
        .raw_batch(&(0..400).collect::<Vec<_>>(), Some((crop, 7)))
        .unwrap();
    assert_eq!(raw.side, 48);
    assert!(raw
        .geometry
        .iter()
        .all(|g| g.dy.abs() <= 6 && g.dx.abs() <= 6));
    assert!(raw.geometry.iter().any(|g| g.dy.abs() == 6));
    // AutoAugment at 48: the same batch each time, of the same size
    let auto = Augment::parse("crop,flip,autoaugment").unwrap();
    let (a1, _) = big.batch(&[0, 5], Some((auto, 3))).unwrap();
    let (a2, _) = big.batch(&[0, 5], Some((auto, 3))).unwrap();
    assert_eq!(a1.dims(), [2, 3, 48, 48]);
    assert_eq!(a1.to_vec_f32(), a2.to_vec_f32());

    // a custom normalisation: (v / 255 − mean) / std per channel, on both paths
    let norm = Normalize {
        mean: [0.5, 0.0, 1.0],
        std: [0.5, 2.0, 0.25],
    };
    let custom = digits.clone().with_norm(norm);
    let (x, _) = custom.batch(&[3], None).unwrap();
    let (x0, _) = digits.batch(&[3], None).unwrap();
    assert_ne!(x.to_vec_f32(), x0.to_vec_f32());
    let px = &digits.images[3 * 3072..4 * 3072];
    for (i, got) in x.to_vec_f32().into_iter().enumerate() {
        let c = i / 1024;
        let want = (px[i] as f32 / 255.0 - norm.mean[c]) / norm.std[c];
        assert!((got - want).abs() < 1e-6, "element {i}: {got} vs {want}");
    }
    let (raw, _) = custom.raw_batch(&[3], None).unwrap();
    assert_eq!(raw.norm, norm);
    assert_eq!(raw.to_images().unwrap().to_vec_f32(), x.to_vec_f32());
}

/// An image folder skips nothing silently: an image whose name is not UTF-8 is read;
/// a class entry that is neither a folder nor a regular file (a named pipe, a looping
/// link) and a class folder whose name is not UTF-8 are errors naming them.
#[test]
fn image_folders_read_or_refuse_every_entry_never_skip_it() {
    use std::os::unix::ffi::OsStrExt;
    let dir = temp_dir("folder-entries");
    for split in ["train", "test"] {
        for class in ["a", "b"] {
            let d = dir.join(split).join(class);
            std::fs::create_dir_all(&d).unwrap();
            write_image(&d.join("x.png"), 32, 32, 0);
        }
    }
    std::fs::write(dir.join("train/notes.txt"), "a regular file: skipped").unwrap();
    let odd = std::ffi::OsStr::from_bytes(b"\xff\xfe.png");
    write_image(&dir.join("train/a").join(odd), 32, 32, 0);
    let (train, test) = Dataset::open(&dir).unwrap();
    assert_eq!(
        (train.len(), test.len()),
        (3, 2),
        "the non-UTF-8 name is read"
    );
    assert_eq!(train.labels, [0, 0, 1]);

    let check = |what: &str, want: &str| {
        let d = dir.clone();
        let e = within_20s(move || Dataset::open(&d).unwrap_err().to_string());
        assert!(e.contains(want), "{what}: {e}");
    };
    for split in ["train", "test"] {
        let fifo = dir.join(split).join("c");
        mkfifo(&fifo);
        check(
            "fifo",
            &format!("{split}/c: is neither a class folder nor a regular file"),
        );
        std::fs::remove_file(&fifo).unwrap();
        let lp = dir.join(split).join("loop");
        std::os::unix::fs::symlink("loop", &lp).unwrap();
        check("loop", &format!("{split}/loop: "));
        std::fs::remove_file(&lp).unwrap();
        let bad = dir.join(split).join(std::ffi::OsStr::from_bytes(b"c\xff"));
        std::fs::create_dir(&bad).unwrap();
        check("name", "class folder's name must be UTF-8");
        std::fs::remove_dir(&bad).unwrap();
    }
    assert!(Dataset::open(&dir).is_ok());
    std::fs::remove_dir_all(&dir).unwrap();
}
