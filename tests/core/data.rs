//! Data sets: the CIFAR-10 binary reader's checks, the image-folder reader, and the
//! CIFAR-10 archive extraction and download (from archives built here).

use crate::common::{ferrovit, mkfifo, png_header, temp_dir, within_20s};
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
    assert_eq!(
        std::fs::read_dir(dir.join("cut")).unwrap().count(),
        0,
        "nothing left behind"
    );
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
    mkfifo(&cifar.join("data_batch_1.bin"));
    let c = cifar.clone();
    let e = within_20s(move || Dataset::open(&c).unwrap_err().to_string());
    assert!(
        e.contains("data_batch_1.bin") && e.contains("named pipe (FIFO)"),
        "{e}"
    );
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
