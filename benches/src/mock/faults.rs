//! Fault injection: failures, stalls, cut connections, a dead engine, a flapping /health.

use serde::{Deserialize, Serialize};

/// Faults one engine injects. Set from flags at startup; `POST /mock/faults` changes them.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Faults {
    /// The engine is dead: /health answers 503 and completions 500.
    pub dead: bool,
    /// Fraction (0..1) of completion requests failed with `fail_status`.
    pub fail_rate: f64,
    /// Status of injected failures.
    pub fail_status: u16,
    /// Streams stop sending (but stay open) after this many tokens.
    pub stall_after: Option<usize>,
    /// Connections are cut after this many tokens.
    pub cut_after: Option<usize>,
    /// /health alternates between this many 200s and this many 503s.
    pub flap_health: Option<u64>,
    /// Health probes answered (drives `flap_health`).
    #[serde(skip_deserializing)]
    pub health_probes: u64,
}

/// A partial update of [`Faults`] (`POST /mock/faults`); absent keys keep their value, `null`
/// clears an optional one.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultsUpdate {
    dead: Option<bool>,
    fail_rate: Option<f64>,
    fail_status: Option<u16>,
    #[serde(default, with = "double_option")]
    stall_after: Option<Option<usize>>,
    #[serde(default, with = "double_option")]
    cut_after: Option<Option<usize>>,
    #[serde(default, with = "double_option")]
    flap_health: Option<Option<u64>>,
}

mod double_option {
    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, T: Deserialize<'de>, D: Deserializer<'de>>(d: D) -> Result<Option<Option<T>>, D::Error> {
        Option::<T>::deserialize(d).map(Some)
    }
}

impl Faults {
    /// Applies an update, rejecting out-of-range values.
    pub fn apply(&mut self, u: FaultsUpdate) -> Result<(), String> {
        if let Some(r) = u.fail_rate {
            if !(0.0..=1.0).contains(&r) {
                return Err("fail_rate must be in 0..=1".into());
            }
            self.fail_rate = r;
        }
        if let Some(s) = u.fail_status {
            if !(400..=599).contains(&s) {
                return Err("fail_status must be in 400..=599".into());
            }
            self.fail_status = s;
        }
        if let Some(d) = u.dead {
            self.dead = d;
        }
        if let Some(v) = u.stall_after {
            self.stall_after = v;
        }
        if let Some(v) = u.cut_after {
            self.cut_after = v;
        }
        if let Some(v) = u.flap_health {
            self.flap_health = v;
            self.health_probes = 0;
        }
        Ok(())
    }

    /// Answers one /health probe: whether the engine reports healthy.
    pub fn probe_health(&mut self) -> bool {
        let n = self.health_probes;
        self.health_probes += 1;
        if self.dead {
            return false;
        }
        match self.flap_health {
            Some(k) if k > 0 => (n / k).is_multiple_of(2),
            _ => true,
        }
    }
}
