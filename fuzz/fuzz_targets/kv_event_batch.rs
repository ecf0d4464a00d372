//! vLLM KV-event batches: decoding any bytes never panics, every borrowed slice is a well-formed
//! part of the input, and applying what decodes keeps the sink consistent (no removal of an
//! absent block, the block cap holds; a repeated store refreshes).
#![no_main]

use std::collections::HashSet;

use gantry_kvindex::decode::{decode_batch, DecodedEvent};
use gantry_kvindex::sink::{BlockSink, Counter, EngineSlot};
use gantry_kvindex::subscriber::{EngineSource, EventApplier};
use libfuzzer_sys::fuzz_target;

const CAP: usize = 8;

#[derive(Default)]
struct Model {
    blocks: [HashSet<u64>; 2],
}

impl BlockSink for Model {
    fn store(&mut self, engine: EngineSlot, hash: u64, _pos: u64) {
        // A store of a held block refreshes it (the sink contract: stores are idempotent).
        self.blocks[usize::from(engine)].insert(hash);
    }
    fn remove(&mut self, engine: EngineSlot, hash: u64, _pos: u64) {
        assert!(self.blocks[usize::from(engine)].remove(&hash), "remove of an absent block");
    }
    fn count(&mut self, _: Counter, _: u64) {}
}

fuzz_target!(|data: &[u8]| {
    let Ok(batch) = decode_batch(data) else { return };
    assert!(batch.events.len() <= data.len());
    for event in &batch.events {
        if let DecodedEvent::BlockStored(e) = event {
            for raw in e.extra_keys.iter().flatten().flatten() {
                assert!(!raw.is_empty() && raw.len() <= data.len());
            }
        }
    }
    // Engine 0: block size 4, two DP ranks; engine 1: block size 1 and a tiny cap.
    let mut applier = EventApplier::new(Model::default());
    let engines = [
        EngineSource { slot: 0, block_size: 4, dp_ranks: 2, ..EngineSource::default() },
        EngineSource { slot: 1, block_size: 1, max_blocks: CAP, ..EngineSource::default() },
    ];
    for e in &engines {
        applier.add_engine(e).unwrap();
    }
    for _ in 0..2 {
        applier.apply_batch(0, 0, &batch);
        applier.apply_batch(0, 1, &batch);
        applier.apply_batch(1, 0, &batch);
    }
    assert!(applier.engine_stats(1).unwrap().1 <= CAP as u64);
    applier.clear_rank(0, 0);
    applier.clear_rank(0, 1);
    assert!(applier.sink().blocks[0].is_empty(), "clearing every rank empties the engine");
    assert!(applier.remove_engine(1));
    assert!(applier.sink().blocks[1].is_empty());
});
