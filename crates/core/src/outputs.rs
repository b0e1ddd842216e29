//! What a stage hands to the stages after it: outputs tied to the item they came
//! from, published when that item's ack commits, and how a batch of them is kept.
//!
//! A batch is one row of the store (a flush's outputs of one stage), never a row
//! per output: `encode`/`decode` pack it as length-prefixed fields.

use serde::{Deserialize, Serialize};

/// One output of an item.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Output {
    /// A record: bytes without a newline (a downstream item's value as it is).
    Record(Vec<u8>),
    /// A file put in the blob store: its content address (blake3, hex), the name it
    /// had (a downstream task sees it under that name) and its length.
    File {
        /// blake3 of the content, hex: the blob's key.
        key: String,
        /// The file's name (last path component) when it was handed over.
        name: String,
        /// Length, bytes.
        bytes: u64,
    },
    /// A fragment's result (its final checkpoint): a checkpoint blob of the store.
    Result(i64),
}

/// The outputs of one acked item, in the order the task wrote them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ItemOutputs {
    /// The item's index in its stage.
    pub item: u64,
    /// Its outputs.
    pub outputs: Vec<Output>,
}

/// One published output: where it came from and what it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Published {
    /// The upstream item it came from.
    pub item: u64,
    /// Its position among that item's outputs.
    pub ordinal: u32,
    /// The output.
    pub output: Output,
}

/// Flattens item outputs into the stable published order: by upstream item, then
/// by the order the task wrote them.
pub fn publish_order(mut items: Vec<ItemOutputs>) -> Vec<Published> {
    items.sort_by_key(|i| i.item);
    items
        .into_iter()
        .flat_map(|i| {
            let item = i.item;
            i.outputs
                .into_iter()
                .enumerate()
                .map(move |(k, output)| Published {
                    item,
                    ordinal: k as u32,
                    output,
                })
        })
        .collect()
}

const RECORD: u8 = 0;
const FILE: u8 = 1;
const RESULT: u8 = 2;

/// Packs published outputs into one row's bytes.
pub fn encode(batch: &[Published]) -> Vec<u8> {
    let mut out = Vec::new();
    let bytes = |out: &mut Vec<u8>, b: &[u8]| {
        out.extend_from_slice(&(b.len() as u64).to_le_bytes());
        out.extend_from_slice(b);
    };
    for p in batch {
        out.extend_from_slice(&p.item.to_le_bytes());
        out.extend_from_slice(&p.ordinal.to_le_bytes());
        match &p.output {
            Output::Record(v) => {
                out.push(RECORD);
                bytes(&mut out, v);
            }
            Output::File {
                key,
                name,
                bytes: n,
            } => {
                out.push(FILE);
                bytes(&mut out, key.as_bytes());
                bytes(&mut out, name.as_bytes());
                out.extend_from_slice(&n.to_le_bytes());
            }
            Output::Result(id) => {
                out.push(RESULT);
                out.extend_from_slice(&id.to_le_bytes());
            }
        }
    }
    out
}

/// Unpacks a row's bytes; `None` if they are not a batch [`encode`] wrote.
pub fn decode(mut data: &[u8]) -> Option<Vec<Published>> {
    fn take<'a>(data: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        if data.len() < n {
            return None;
        }
        let (head, rest) = data.split_at(n);
        *data = rest;
        Some(head)
    }
    fn u64_of(data: &mut &[u8]) -> Option<u64> {
        Some(u64::from_le_bytes(take(data, 8)?.try_into().ok()?))
    }
    fn bytes(data: &mut &[u8]) -> Option<Vec<u8>> {
        let n = usize::try_from(u64_of(data)?).ok()?;
        Some(take(data, n)?.to_vec())
    }
    let mut batch = Vec::new();
    while !data.is_empty() {
        let item = u64_of(&mut data)?;
        let ordinal = u32::from_le_bytes(take(&mut data, 4)?.try_into().ok()?);
        let output = match take(&mut data, 1)?[0] {
            RECORD => Output::Record(bytes(&mut data)?),
            FILE => Output::File {
                key: String::from_utf8(bytes(&mut data)?).ok()?,
                name: String::from_utf8(bytes(&mut data)?).ok()?,
                bytes: u64_of(&mut data)?,
            },
            RESULT => Output::Result(u64_of(&mut data)? as i64),
            _ => return None,
        };
        batch.push(Published {
            item,
            ordinal,
            output,
        });
    }
    Some(batch)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn outputs_publish_by_item_then_in_written_order() {
        let items = vec![
            ItemOutputs {
                item: 7,
                outputs: vec![Output::Record(b"b".to_vec()), Output::Record(b"a".to_vec())],
            },
            ItemOutputs {
                item: 3,
                outputs: vec![Output::Result(9)],
            },
        ];
        let order: Vec<(u64, u32)> = publish_order(items)
            .iter()
            .map(|p| (p.item, p.ordinal))
            .collect();
        assert_eq!(order, [(3, 0), (7, 0), (7, 1)]);
    }

    fn output() -> impl Strategy<Value = Output> {
        prop_oneof![
            prop::collection::vec(any::<u8>(), 0..20).prop_map(Output::Record),
            ("[a-f0-9]{0,8}", ".{0,8}", any::<u64>())
                .prop_map(|(key, name, bytes)| { Output::File { key, name, bytes } }),
            any::<i64>().prop_map(Output::Result),
        ]
    }

    proptest! {
        #[test]
        fn a_batch_decodes_to_what_was_encoded(batch in prop::collection::vec((any::<u64>(), any::<u32>(), output()), 0..20)) {
            let batch: Vec<Published> = batch
                .into_iter()
                .map(|(item, ordinal, output)| Published { item, ordinal, output })
                .collect();
            prop_assert_eq!(decode(&encode(&batch)), Some(batch.clone()));
            let bytes = encode(&batch);
            if !bytes.is_empty() {
                // A cut batch is refused, never read as something else.
                prop_assert!(decode(&bytes[..bytes.len() - 1]).is_none());
            }
        }
    }
}
