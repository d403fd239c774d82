//! Per-row routing: one request carrying many devices' rows, each with its own routing key
//! ([`canary::ROW_ROUTING_KEYS_INPUT`]), as the stream processor sends when it batches
//! readings. Under a rollout each row must be answered by the side its key falls on, just
//! as if it had come alone, so a device stays sticky to one version however its readings
//! are batched: the rows are grouped by where their keys route them (canary; stable and
//! shadowed; stable), each group runs as a request of its own (analysis window, shadowing,
//! metrics as before), and the outputs are put back in row order. The response then says
//! which version answered each row ([`canary::ROW_VERSIONS_OUTPUT`]); a request without
//! per-row keys never gets that output, so plain TF Serving clients see nothing new.

use std::collections::BTreeMap;
use std::sync::Arc;

use canary::split::Arm;
use savedmodel::Tensor;

use super::{Call, Inference, InferenceResponse};
use crate::error::ServeError;
use crate::repository::{LoadedVersion, VersionSelector};

/// Rows routed alike: the version's side, and whether the stable side shadows them.
type Route = (bool, bool);

/// One group's rows (their places in the request) and what its version answered.
struct Part {
    rows: Vec<usize>,
    version: i64,
    outputs: BTreeMap<String, Tensor>,
}

impl Inference {
    /// Runs admitted `inputs` whose rows carry `keys` (one each), `version` being the one
    /// the first key resolved to.
    pub(super) async fn run_per_row(
        &self,
        version: Arc<LoadedVersion>,
        call: &Call<'_>,
        inputs: Vec<(String, Tensor)>,
        keys: Vec<Vec<u8>>,
    ) -> Result<InferenceResponse, ServeError> {
        let rows = keys.len();
        if let Some((name, tensor)) = inputs.iter().find(|(_, t)| t.rank() == 0 || t.shape()[0] != rows) {
            return Err(ServeError::InvalidArgument(format!(
                "{} has {rows} routing keys but input {name:?} has shape {:?}: one key per row",
                canary::ROW_ROUTING_KEYS_INPUT,
                tensor.shape()
            )));
        }
        let signature = call.signature.to_owned();
        // Routed as `resolve` routes a request with one key.
        let Some((split, _)) = call.latest.then(|| self.rollouts.route(&version.model, None)).flatten() else {
            // No rollout routes these rows: they all go to the version already resolved.
            let mut outputs = self.answer(&version, call, inputs, keys.first().map(Vec::as_slice)).await?;
            outputs.insert(canary::ROW_VERSIONS_OUTPUT.to_owned(), versions_tensor(&vec![version.version; rows])?);
            return Ok(InferenceResponse { version, signature, outputs });
        };
        let mut groups: BTreeMap<Route, Vec<usize>> = BTreeMap::new();
        for (row, key) in keys.iter().enumerate() {
            let canary = split.arm(&version.model, Some(key), &mut rand::rng()) == Arm::Canary;
            let shadowed = !canary && self.rollouts.shadow(&version.model, Some(key)).is_some();
            groups.entry((canary, shadowed)).or_default().push(row);
        }
        let mut parts = Vec::with_capacity(groups.len());
        let mut answered_first = None;
        // All rows routed alike (one group) run on the inputs as they are, not a copy.
        let (mut whole, to_split) = if groups.len() == 1 { (Some(inputs), Vec::new()) } else { (None, inputs) };
        for rows_of_group in groups.into_values() {
            let key = keys[rows_of_group[0]].as_slice();
            let group_version = self.resolve(&version.model, &VersionSelector::Latest, Some(key))?;
            let group_inputs = match whole.take() {
                Some(all) => all,
                None => to_split
                    .iter()
                    .map(|(name, tensor)| Ok((name.clone(), take_rows(tensor, &rows_of_group)?)))
                    .collect::<Result<Vec<_>, ServeError>>()?,
            };
            let outputs = self.answer(&group_version, call, group_inputs, Some(key)).await?;
            if rows_of_group[0] == 0 {
                answered_first = Some(group_version.clone());
            }
            parts.push(Part { rows: rows_of_group, version: group_version.version, outputs });
        }
        let mut versions = vec![0; rows];
        for part in &parts {
            for &row in &part.rows {
                versions[row] = part.version;
            }
        }
        let mut outputs = merge_rows(&parts, rows)?;
        outputs.insert(canary::ROW_VERSIONS_OUTPUT.to_owned(), versions_tensor(&versions)?);
        // The response's model spec names the version that answered the first row.
        Ok(InferenceResponse { version: answered_first.unwrap_or(version), signature, outputs })
    }
}

fn versions_tensor(versions: &[i64]) -> Result<Tensor, ServeError> {
    Tensor::from_shape(&[versions.len()], versions).map_err(|e| ServeError::Internal(format!("{e:#}")))
}

/// The given rows of `tensor` (along its first axis), in that order.
fn take_rows(tensor: &Tensor, rows: &[usize]) -> Result<Tensor, ServeError> {
    let slices = rows
        .iter()
        .map(|&row| tensor.slice(0, row, row + 1))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ServeError::Internal(format!("{e:#}")))?;
    Tensor::stack_tensors(0, &slices).map_err(|e| ServeError::Internal(format!("{e:#}")))
}

/// Puts the groups' outputs back in row order: each output every group answered, row `r`
/// taken from the group that holds `r`.
fn merge_rows(parts: &[Part], rows: usize) -> Result<BTreeMap<String, Tensor>, ServeError> {
    // Where each row is: (group, position in the group's outputs).
    let mut place = vec![(0, 0); rows];
    for (group, part) in parts.iter().enumerate() {
        for (position, &row) in part.rows.iter().enumerate() {
            place[row] = (group, position);
        }
    }
    let mut merged = BTreeMap::new();
    let Some(first) = parts.first() else { return Ok(merged) };
    for name in first.outputs.keys() {
        let mut slices = Vec::with_capacity(rows);
        for &(group, position) in &place {
            let part = &parts[group];
            let tensor = part.outputs.get(name).filter(|t| t.rank() > 0 && t.shape()[0] == part.rows.len());
            let tensor = tensor.ok_or_else(|| {
                ServeError::Internal(format!(
                    "version {} did not answer output {name:?} row by row, so rows routed to different versions \
                     cannot be merged",
                    part.version
                ))
            })?;
            slices.push(tensor.slice(0, position, position + 1).map_err(|e| ServeError::Internal(format!("{e:#}")))?);
        }
        let tensor = Tensor::stack_tensors(0, &slices).map_err(|e| ServeError::Internal(format!("{e:#}")))?;
        merged.insert(name.clone(), tensor);
    }
    Ok(merged)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_taken_and_put_back_in_order() {
        let tensor = Tensor::from_shape(&[4, 2], &[0f32, 1., 10., 11., 20., 21., 30., 31.]).unwrap();
        let odd = take_rows(&tensor, &[1, 3]).unwrap();
        assert_eq!(odd.try_as_plain_ram().unwrap().as_slice::<f32>().unwrap(), &[10., 11., 30., 31.]);
        let even = take_rows(&tensor, &[0, 2]).unwrap();
        let parts = [
            Part { rows: vec![1, 3], version: 2, outputs: [("x".to_owned(), odd)].into() },
            Part { rows: vec![0, 2], version: 1, outputs: [("x".to_owned(), even)].into() },
        ];
        let merged = merge_rows(&parts, 4).unwrap();
        assert_eq!(
            merged["x"].try_as_plain_ram().unwrap().as_slice::<f32>().unwrap().to_vec(),
            tensor.try_as_plain_ram().unwrap().as_slice::<f32>().unwrap().to_vec()
        );
        // An output that lost its batch axis cannot be merged, and the error says so.
        let scalar = Part { rows: vec![0], version: 3, outputs: [("x".to_owned(), Tensor::from(1f32))].into() };
        let error = merge_rows(&[scalar], 1).unwrap_err().to_string();
        assert!(error.contains("version 3") && error.contains("\"x\""), "{error}");
    }
}
