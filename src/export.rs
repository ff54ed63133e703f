//! The trained global model as a [safetensors] file, for serving.
//!
//! safetensors is a plain format read by numpy, PyTorch, JAX and the
//! `safetensors` libraries: an 8-byte little-endian header length, a JSON
//! header naming each tensor's dtype, shape and byte range, then the raw
//! little-endian data. fedrec writes one `F32` tensor per tensor of the
//! model's layout (matrix factorization: `item_factors` items × k and
//! `item_bias` items; federated EASE: `ease_p_upper`), and in the header's
//! `__metadata__` (string values only, as the format requires):
//!
//! - `item_ids`: the catalogue, a JSON list of strings in model order (row
//!   `i` of `item_factors` is item `item_ids[i]`);
//! - `model_version`: the global model's version;
//! - `format`: `fedrec-model-1`.
//!
//! A shopper's score for item `i` is `item_factors[i] · u + item_bias[i]`
//! for the shopper's private vector `u` (which never leaves the device).
//!
//! [safetensors]: https://huggingface.co/docs/safetensors

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use anyhow::{Context, bail};
use fedrec_proto::Layout;
use fedrec_proto::catalogue::Catalogue;

/// The `format` value in the metadata.
pub const FORMAT: &str = "fedrec-model-1";

/// Writes `params` (laid out as `layout`) with `catalogue`'s item ids to
/// `path` as safetensors, replacing the file through a temporary one.
pub fn write_model(
    path: &Path,
    layout: &Layout,
    params: &[f32],
    catalogue: &Catalogue,
    model_version: u64,
) -> anyhow::Result<()> {
    let bytes = encode_model(layout, params, catalogue, model_version)?;
    write_atomically(path, &bytes)
        .with_context(|| format!("cannot write the model to {}", path.display()))
}

/// Replaces `path` with `bytes` through a temporary file beside it, flushed
/// before it is renamed into place: a crash leaves the old file or the new
/// one, never a mix.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// The safetensors bytes of a model (see the module docs).
pub fn encode_model(
    layout: &Layout,
    params: &[f32],
    catalogue: &Catalogue,
    model_version: u64,
) -> anyhow::Result<Vec<u8>> {
    if layout.num_values() != params.len() {
        bail!(
            "the model has {} values but its layout ({layout}) needs {}",
            params.len(),
            layout.num_values()
        );
    }
    let mut metadata = BTreeMap::new();
    metadata.insert("format", FORMAT.to_owned());
    metadata.insert("model_version", model_version.to_string());
    metadata.insert("item_ids", serde_json::to_string(&catalogue.ids())?);
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::to_value(&metadata)?);
    let mut offset = 0_usize;
    for (name, shape) in layout.tensors() {
        let len = shape.iter().product::<u64>() as usize * 4;
        header.insert(
            name.clone(),
            serde_json::json!({
                "dtype": "F32",
                "shape": shape,
                "data_offsets": [offset, offset + len],
            }),
        );
        offset += len;
    }
    let mut json = serde_json::to_vec(&header)?;
    // The data start 8-byte aligned (the format pads the header with spaces).
    while json.len() % 8 != 0 {
        json.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + json.len() + params.len() * 4);
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    for v in params {
        out.extend_from_slice(&v.to_le_bytes());
    }
    Ok(out)
}

/// A model read back from safetensors bytes.
#[derive(Clone, Debug, PartialEq)]
pub struct ExportedModel {
    /// The metadata (`item_ids`, `model_version`, `format`).
    pub metadata: BTreeMap<String, String>,
    /// Each tensor: its shape and values.
    pub tensors: BTreeMap<String, (Vec<u64>, Vec<f32>)>,
}

/// Reads safetensors bytes of `F32` tensors (what [`encode_model`] writes).
pub fn decode_model(bytes: &[u8]) -> anyhow::Result<ExportedModel> {
    let len_bytes: [u8; 8] = bytes
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .context("not a safetensors file: shorter than 8 bytes")?;
    let n = usize::try_from(u64::from_le_bytes(len_bytes))?;
    let header = bytes
        .get(8..8 + n)
        .context("not a safetensors file: the header is cut short")?;
    let data = &bytes[8 + n..];
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(header)?;
    let mut model = ExportedModel {
        metadata: BTreeMap::new(),
        tensors: BTreeMap::new(),
    };
    for (name, value) in header {
        if name == "__metadata__" {
            model.metadata = serde_json::from_value(value)?;
            continue;
        }
        #[derive(serde::Deserialize)]
        struct Info {
            dtype: String,
            shape: Vec<u64>,
            data_offsets: [usize; 2],
        }
        let info: Info = serde_json::from_value(value)?;
        if info.dtype != "F32" {
            bail!("tensor {name} is {}, not F32", info.dtype);
        }
        let [a, b] = info.data_offsets;
        let raw = data
            .get(a..b)
            .with_context(|| format!("tensor {name}'s bytes are outside the file"))?;
        let values: Vec<f32> = raw
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        if values.len() as u64 != info.shape.iter().product::<u64>() {
            bail!("tensor {name}'s bytes do not match its shape");
        }
        model.tensors.insert(name, (info.shape, values));
    }
    Ok(model)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_with_item_ids_in_the_metadata() {
        let layout = Layout::new(vec![
            ("item_factors".into(), vec![3, 2]),
            ("item_bias".into(), vec![3]),
        ]);
        let params = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 0.1, 0.2, 0.3];
        let catalogue = Catalogue::from_ids(vec!["a".into(), "b".into(), "c".into()]).unwrap();
        let bytes = encode_model(&layout, &params, &catalogue, 7).unwrap();
        let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        assert_eq!((8 + header_len) % 8, 0, "data start aligned");
        let model = decode_model(&bytes).unwrap();
        assert_eq!(model.metadata["item_ids"], r#"["a","b","c"]"#);
        assert_eq!(model.metadata["model_version"], "7");
        assert_eq!(model.tensors["item_factors"].0, vec![3, 2]);
        assert_eq!(model.tensors["item_factors"].1, params[..6].to_vec());
        assert_eq!(model.tensors["item_bias"].1, params[6..].to_vec());
        assert!(encode_model(&layout, &params[..4], &catalogue, 7).is_err());
    }
}
