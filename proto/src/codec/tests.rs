//! Error bounds of every encoding on seeded random models (a property test
//! without a property-testing crate: many seeded cases, each a different
//! scale and shape), chunking independence, and malformed chunks.

use super::*;
use rand_chacha::ChaCha8Rng;
use rand_core::{Rng, SeedableRng};

/// A uniform value in [-1, 1).
fn unit(rng: &mut ChaCha8Rng) -> f32 {
    (rng.next_u32() >> 8) as f32 / (1 << 23) as f32 - 1.0
}

/// A model of a random length whose values span `scale`, with occasional
/// outliers, exact zeros and tiny (f16-subnormal) values.
fn model(rng: &mut ChaCha8Rng, scale: f32) -> Vec<f32> {
    let len = 1 + rng.next_u32() as usize % 3000;
    (0..len)
        .map(|_| match rng.next_u32() % 50 {
            0 => unit(rng) * scale * 1000.0,
            1 => 0.0,
            2 => unit(rng) * 1e-6,
            _ => unit(rng) * scale + scale * 0.3,
        })
        .collect()
}

/// Any finite f32, from its bits.
fn any_finite(rng: &mut ChaCha8Rng) -> f32 {
    loop {
        let v = f32::from_bits(rng.next_u32());
        if v.is_finite() {
            return v;
        }
    }
}

/// Checks every decoded value against the encoding's stated bound.
fn assert_within_bound(values: &[f32], encoding: Encoding) {
    let decoded = EncodedModel::new(values, encoding).decode();
    assert_eq!(decoded.len(), values.len());
    if let Some(i) = encoding.first_beyond_bound(values, &decoded, Q8_BLOCK) {
        panic!(
            "{encoding}: {} decoded as {} (block {})",
            values[i],
            decoded[i],
            i / Q8_BLOCK
        );
    }
}

#[test]
fn every_encoding_stays_within_its_bound() {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    for case in 0..200 {
        let scale = [1e-6, 1e-3, 0.1, 1.0, 30.0, 1e4][case % 6];
        let values = model(&mut rng, scale);
        for encoding in Encoding::ALL {
            assert_within_bound(&values, encoding);
        }
    }
    assert_eq!(
        EncodedModel::new(&[1.5, -0.1], Encoding::F32).decode(),
        vec![1.5, -0.1]
    );
}

#[test]
fn extreme_values_stay_within_bound_and_finite() {
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    for _ in 0..50 {
        let values: Vec<f32> = (0..600).map(|_| any_finite(&mut rng)).collect();
        for encoding in Encoding::ALL {
            assert_within_bound(&values, encoding);
        }
    }
    let edges = [
        f32::MAX,
        f32::MIN,
        65519.0,
        -70000.0,
        f32::MIN_POSITIVE,
        0.0,
    ];
    for encoding in Encoding::ALL {
        assert_within_bound(&edges, encoding);
    }
    // f16 saturates instead of overflowing.
    assert_eq!(
        EncodedModel::new(&[1e6, -1e6], Encoding::F16).decode(),
        vec![65504.0, -65504.0]
    );
}

#[test]
fn constant_blocks_are_exact() {
    let values = vec![0.25_f32; 700];
    assert_eq!(EncodedModel::new(&values, Encoding::Q8).decode(), values);
}

#[test]
fn chunks_decode_to_the_same_values_whatever_their_size() {
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let values = model(&mut rng, 0.5);
    let layout = Layout::new(vec![("v".into(), vec![values.len() as u64])]);
    for encoding in Encoding::ALL {
        let encoded = EncodedModel::new(&values, encoding);
        let whole = encoded.decode();
        for chunk_bytes in [1, 100, 265, 1000, 4096, 1 << 20] {
            let mut device = ModelAssembler::new(layout.clone());
            let mut sent = 0;
            for (i, mut chunk) in encoded.chunks(chunk_bytes).enumerate() {
                if i == 0 {
                    chunk.layout = layout.to_pb();
                }
                sent += chunk.values.len()
                    + 4 * chunk.q8.as_ref().map_or(0, |q| q.min.len() + q.scale.len());
                assert!(
                    chunk.values.len() <= chunk_bytes.max(Q8_BLOCK),
                    "{encoding}: {} bytes",
                    chunk.values.len()
                );
                device.add(&chunk).unwrap();
            }
            assert_eq!(sent, encoded.wire_bytes(), "{encoding}");
            assert_eq!(device.finish().unwrap(), whole, "{encoding}, {chunk_bytes}");
        }
    }
}

#[test]
fn sizes_per_value() {
    let values = vec![0.5_f32; 1024];
    let size = |e| EncodedModel::new(&values, e).wire_bytes();
    assert_eq!(size(Encoding::F32), 4096);
    assert_eq!(size(Encoding::F16), 2048);
    assert_eq!(size(Encoding::Q8), 1024 + 4 * 8);
}

#[test]
fn an_old_style_f32_chunk_decodes() {
    // What a coordinator from before the encoding field sends: no encoding,
    // no q8 blocks.
    let chunk = pb::ModelChunk {
        model_version: 3,
        layout: layout(2).to_pb(),
        offset: 0,
        values: tensor::encode(&[1.0, -2.5]),
        ..Default::default()
    };
    let mut device = ModelAssembler::new(layout(2));
    device.add(&chunk).unwrap();
    assert_eq!(device.finish().unwrap(), vec![1.0, -2.5]);
}

fn layout(n: u64) -> Layout {
    Layout::new(vec![("v".into(), vec![n])])
}

fn q8_chunk(values: &[u8], block_values: u32, min: Vec<f32>, scale: Vec<f32>) -> pb::ModelChunk {
    pb::ModelChunk {
        values: Bytes::copy_from_slice(values),
        encoding: pb::ValueEncoding::Q8.into(),
        q8: Some(pb::Q8Blocks {
            block_values,
            min,
            scale,
        }),
        ..Default::default()
    }
}

#[test]
fn q8_blocks_longer_than_a_decoding_batch_decode_exactly() {
    // 1,300 values in blocks of 1,000: each block spans several batches of
    // DECODE_BATCH, and the last block is short.
    let n = 1300;
    let q: Vec<u8> = (0..n).map(|i| (i * 7 % 256) as u8).collect();
    let (min, scale) = (vec![-1.0_f32, 2.0], vec![0.01_f32, 0.5]);
    let want: Vec<f32> = q
        .iter()
        .enumerate()
        .map(|(i, &q)| {
            let b = i / 1000;
            (f64::from(min[b]) + f64::from(q) * f64::from(scale[b])) as f32
        })
        .collect();
    let chunk = q8_chunk(&q, 1000, min, scale);
    let mut device = ModelAssembler::new(layout(n as u64));
    device.add(&chunk).unwrap();
    assert_eq!(device.finish().unwrap(), want);
    let run = pb::EncodedValues {
        offset: 0,
        encoding: chunk.encoding,
        values: chunk.values.clone(),
        q8: chunk.q8.clone(),
    };
    let mut out = Vec::new();
    append_update_run(&run, &mut out, n).unwrap();
    assert_eq!(out, tensor::encode(&want));
}

/// The error of feeding `chunk` alone to a device expecting `n` values.
fn refusal(n: u64, chunk: pb::ModelChunk) -> CodecError {
    ModelAssembler::new(layout(n)).add(&chunk).unwrap_err()
}

#[test]
fn malformed_chunks_are_refused_with_the_reason() {
    let f16 = |bytes: &[u8]| pb::ModelChunk {
        values: Bytes::copy_from_slice(bytes),
        encoding: pb::ValueEncoding::F16.into(),
        ..Default::default()
    };
    assert_eq!(
        refusal(2, f16(&[0, 0, 0])),
        CodecError::Misaligned {
            encoding: Encoding::F16,
            bytes: 3
        }
    );
    let err = refusal(
        2,
        pb::ModelChunk {
            values: Bytes::from_static(&[0; 5]),
            ..Default::default()
        },
    );
    assert!(err.to_string().contains("5 bytes"), "{err}");
    assert_eq!(
        refusal(
            2,
            pb::ModelChunk {
                encoding: 7,
                ..Default::default()
            }
        ),
        CodecError::UnknownEncoding(7)
    );
    assert_eq!(
        refusal(1, f16(&[0, 0, 0, 0])),
        CodecError::Overrun {
            offset: 0,
            len: 2,
            total: 1
        }
    );
    let mut late = f16(&[0, 0]);
    late.offset = 1;
    assert_eq!(
        refusal(2, late),
        CodecError::OutOfOrder {
            offset: 1,
            expected: 0
        }
    );
    let mut other = f16(&[0, 0]);
    other.layout = layout(3).to_pb();
    assert!(matches!(
        refusal(2, other),
        CodecError::LayoutMismatch { .. }
    ));

    // q8: missing or zero-sized blocks, wrong counts, bad parameters.
    let mut bare = q8_chunk(&[1, 2], 2, vec![0.0], vec![1.0]);
    bare.q8 = None;
    assert_eq!(refusal(2, bare), CodecError::MissingQ8Blocks);
    assert_eq!(
        refusal(2, q8_chunk(&[1, 2], 0, vec![0.0], vec![1.0])),
        CodecError::MissingQ8Blocks
    );
    let err = refusal(3, q8_chunk(&[1, 2, 3], 2, vec![0.0], vec![1.0, 1.0]));
    assert_eq!(
        err,
        CodecError::Q8BlockCount {
            values: 3,
            block_values: 2,
            expected: 2,
            mins: 1,
            scales: 2
        }
    );
    for (min, scale) in [
        (f32::NAN, 1.0),
        (0.0, f32::INFINITY),
        (0.0, -1.0),
        (f32::NEG_INFINITY, 0.0),
    ] {
        let err = refusal(2, q8_chunk(&[1, 2], 2, vec![min], vec![scale]));
        assert!(
            matches!(err, CodecError::Q8BadBlock { block: 0, .. }),
            "{min} {scale}: {err}"
        );
    }
}

#[test]
fn incomplete_or_overflowing_models_are_refused_at_the_end() {
    let mut device = ModelAssembler::new(layout(3));
    device
        .add(&q8_chunk(&[0, 255], 256, vec![0.0], vec![1.0]))
        .unwrap();
    assert_eq!(
        device.finish().unwrap_err(),
        CodecError::Incomplete {
            received: 2,
            total: 3
        }
    );
    // Finite parameters whose values overflow f32.
    let mut device = ModelAssembler::new(layout(1));
    device
        .add(&q8_chunk(&[255], 1, vec![f32::MAX], vec![f32::MAX]))
        .unwrap();
    let err = device.finish().unwrap_err();
    assert!(err.to_string().contains("not finite"), "{err}");
    let mut device = ModelAssembler::new(layout(1));
    device
        .add(&pb::ModelChunk {
            values: tensor::encode(&[f32::NAN]),
            ..Default::default()
        })
        .unwrap();
    assert!(matches!(
        device.finish(),
        Err(CodecError::Tensor(TensorError::NotFinite { index: 0, .. }))
    ));
}

/// An upload's values as the coordinator rebuilds them: f32 parts appended
/// as they are, encoded runs through `append_update_run`.
fn received(parts: impl Iterator<Item = pb::update_chunk::Part>, total: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for part in parts {
        match part {
            pb::update_chunk::Part::Values(bytes) => out.extend_from_slice(&bytes),
            pb::update_chunk::Part::Encoded(run) => {
                append_update_run(&run, &mut out, total).unwrap()
            }
            pb::update_chunk::Part::Header(_) => panic!("values only"),
        }
    }
    out
}

#[test]
fn uploads_decode_to_what_the_device_encoded_in_every_encoding() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    for case in 0..30 {
        let update = model(&mut rng, 10f32.powi(case % 5 - 4));
        for encoding in Encoding::ALL {
            let encoded = EncodedModel::for_upload(&update, encoding);
            assert_eq!(
                encoded.wire_bytes(),
                encoding.upload_wire_bytes(update.len())
            );
            let want = tensor::encode(&encoded.decode());
            for chunk_bytes in [1, 300, 4096, 1 << 20] {
                let parts: Vec<_> = encoded.update_parts(chunk_bytes).collect();
                // f32 travels as plain values (any coordinator reads them);
                // the others as encoded runs.
                assert!(parts.iter().all(|p| matches!(
                    (encoding, p),
                    (Encoding::F32, pb::update_chunk::Part::Values(_))
                        | (
                            Encoding::F16 | Encoding::Q8,
                            pb::update_chunk::Part::Encoded(_)
                        )
                )));
                let got = received(parts.into_iter(), update.len());
                assert_eq!(
                    got, want,
                    "case {case}, {encoding}, chunks of {chunk_bytes} bytes"
                );
            }
            // Within the encoding's bound, block by block of the upload.
            let decoded = encoded.decode();
            assert_eq!(
                encoding.first_beyond_bound(&update, &decoded, Q8_UPLOAD_BLOCK),
                None,
                "{encoding}"
            );
        }
    }
}

#[test]
fn malformed_upload_runs_are_refused_and_leave_the_values_received_so_far() {
    let update: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.1).cos()).collect();
    let q8 = EncodedModel::for_upload(&update, Encoding::Q8);
    let runs: Vec<pb::EncodedValues> = q8
        .update_parts(600)
        .map(|part| match part {
            pb::update_chunk::Part::Encoded(run) => run,
            _ => unreachable!("q8 travels in encoded runs"),
        })
        .collect();
    assert!(runs.len() >= 2);
    let mut out = Vec::new();
    append_update_run(&runs[0], &mut out, 1000).unwrap();
    let kept = out.clone();
    let refuse = |run: pb::EncodedValues, total: usize| {
        let mut out = kept.clone();
        let err = append_update_run(&run, &mut out, total).unwrap_err();
        assert_eq!(out, kept, "{err}: the values received so far are untouched");
        err
    };
    // A gap (the first run again) and a run past the update's end.
    assert!(matches!(
        refuse(runs[0].clone(), 1000),
        CodecError::OutOfOrder { offset: 0, expected } if expected == kept.len() / 4
    ));
    assert!(matches!(
        refuse(runs[1].clone(), kept.len() / 4 + 1),
        CodecError::Overrun { .. }
    ));
    // q8 without its blocks, with too few, or with a NaN minimum.
    let mut run = runs[1].clone();
    run.q8 = None;
    assert_eq!(refuse(run, 1000), CodecError::MissingQ8Blocks);
    let mut run = runs[1].clone();
    run.q8.as_mut().unwrap().scale.pop();
    assert!(matches!(refuse(run, 1000), CodecError::Q8BlockCount { .. }));
    let mut run = runs[1].clone();
    run.q8.as_mut().unwrap().min[1] = f32::NAN;
    let err = refuse(run, 1000);
    assert!(
        matches!(err, CodecError::Q8BadBlock { block: 1, .. }),
        "{err}"
    );
    // An encoding this build does not know, and f16 bytes cut mid-value.
    let mut run = runs[1].clone();
    run.encoding = 99;
    assert_eq!(refuse(run, 1000), CodecError::UnknownEncoding(99));
    let f16 = pb::EncodedValues {
        offset: (kept.len() / 4) as u64,
        values: Bytes::from_static(&[0, 0, 0]),
        encoding: pb::ValueEncoding::F16.into(),
        q8: None,
    };
    assert!(matches!(
        refuse(f16, 1000),
        CodecError::Misaligned { bytes: 3, .. }
    ));
    // What is left of the update still arrives.
    for run in &runs[1..] {
        append_update_run(run, &mut out, 1000).unwrap();
    }
    assert_eq!(out, tensor::encode(&q8.decode()));
}
