//! `--enable_model_warmup`: replays `assets.extra/tf_serving_warmup_requests` (a TFRecord
//! file of `PredictionLog`s, the file TF Serving users already ship) through a freshly
//! loaded version before it becomes AVAILABLE, so the first real request does not pay for
//! lazy initialisation. A warmup request that fails fails the load, as in TF Serving.

use std::io::Read;
use std::path::Path;

use prost::Message;
use proto::tensorflow::serving::PredictionLog;
use proto::tensorflow::serving::prediction_log::LogType;

use crate::admission::{self, RequestLimits, WireTensor};
use crate::repository::LoadedVersion;
use savedmodel::masked_crc32c as masked_crc;

/// Where TF Serving looks for warmup data inside a version directory.
pub const WARMUP_FILE: &str = "assets.extra/tf_serving_warmup_requests";
/// TF Serving's cap on warmup records.
const MAX_RECORDS: usize = 1000;

/// Replays the version's warmup file, if it has one; returns how many requests ran.
/// Warmup records get the default request limits (the server's own flags apply to clients;
/// a warmup request larger than a default one has no business in a warmup file).
const WARMUP_LIMITS: RequestLimits = RequestLimits { max_rows: 65_536, max_batch_rows: None, max_bytes: None };

pub fn replay(version: &LoadedVersion) -> Result<usize, String> {
    let path = version.dir.join(WARMUP_FILE);
    if !path.exists() {
        return Ok(0);
    }
    let records = read_tfrecords(&path)?;
    if records.len() > MAX_RECORDS {
        return Err(format!("{}: {} records, more than the {MAX_RECORDS} allowed", path.display(), records.len()));
    }
    for (index, record) in records.iter().enumerate() {
        let context = |e: String| format!("{} record {index}: {e}", path.display());
        let log = PredictionLog::decode(record.as_slice()).map_err(|e| context(format!("not a PredictionLog: {e}")))?;
        let Some(LogType::PredictLog(predict)) = log.log_type else {
            return Err(context("only predict_log warmup records are supported".into()));
        };
        let request = predict.request.ok_or_else(|| context("predict_log has no request".into()))?;
        let signature = request
            .model_spec
            .as_ref()
            .map(|s| s.signature_name.as_str())
            .filter(|s| !s.is_empty())
            .unwrap_or(savedmodel::DEFAULT_SIGNATURE);
        let (plan, scheduler) = version.signature(signature).map_err(|e| context(e.to_string()))?;
        let wire = request.inputs.into_iter().map(|(name, tensor)| (name, WireTensor::TfProto(tensor))).collect();
        // A warmup file is as untrusted as a request: the same admission and budget.
        let inputs = admission::admit(&version.model, version.version, plan.spec(), wire, WARMUP_LIMITS)
            .map_err(|e| context(e.to_string()))?
            .decode()
            .map_err(context)?;
        // Through the scheduler, as real requests go, so its threads are warm too.
        let prepared = plan.prepare(inputs).map_err(|e| context(e.to_string()))?;
        let answer = scheduler.submit(prepared).map_err(|e| context(e.to_string()))?;
        answer
            .blocking_recv()
            .map_err(|_| context("the inference thread stopped".into()))?
            .map_err(|e| context(e.to_string()))?;
    }
    Ok(records.len())
}

/// Reads every record of a TFRecord file, checking both masked CRC32Cs of each.
pub fn read_tfrecords(path: &Path) -> Result<Vec<Vec<u8>>, String> {
    let mut file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut records = Vec::new();
    let mut rest = bytes.as_slice();
    while !rest.is_empty() {
        let offset = bytes.len() - rest.len();
        let corrupt = |what: &str| format!("{}: record at byte {offset}: {what}", path.display());
        if rest.len() < 12 {
            return Err(corrupt("truncated header"));
        }
        let (length_bytes, tail) = rest.split_at(8);
        let length = u64::from_le_bytes(length_bytes.try_into().expect("8 bytes"));
        let length_crc = u32::from_le_bytes(tail[..4].try_into().expect("4 bytes"));
        if masked_crc(length_bytes) != length_crc {
            return Err(corrupt("length checksum mismatch"));
        }
        let length = usize::try_from(length).map_err(|_| corrupt("length too large"))?;
        let tail = &tail[4..];
        if tail.len() < length.saturating_add(4) {
            return Err(corrupt("truncated data"));
        }
        let (data, tail) = tail.split_at(length);
        let data_crc = u32::from_le_bytes(tail[..4].try_into().expect("4 bytes"));
        if masked_crc(data) != data_crc {
            return Err(corrupt("data checksum mismatch"));
        }
        records.push(data.to_vec());
        rest = &tail[4..];
    }
    Ok(records)
}

/// Writes records in the TFRecord format (tests and tools build warmup files with it).
pub fn write_tfrecords(records: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for record in records {
        let length = (record.len() as u64).to_le_bytes();
        out.extend_from_slice(&length);
        out.extend_from_slice(&masked_crc(&length).to_le_bytes());
        out.extend_from_slice(record);
        out.extend_from_slice(&masked_crc(record).to_le_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tfrecords_round_trip_and_corruption_is_named() {
        let records = vec![b"first".to_vec(), Vec::new(), vec![7; 300]];
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("warmup");
        let mut bytes = write_tfrecords(&records);
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(read_tfrecords(&path).unwrap(), records);
        bytes[14] ^= 1; // inside the first record's data
        std::fs::write(&path, &bytes).unwrap();
        let error = read_tfrecords(&path).unwrap_err();
        assert!(error.contains("warmup") && error.contains("data checksum"), "{error}");
    }
}
