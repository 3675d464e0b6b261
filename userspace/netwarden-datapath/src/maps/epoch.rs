//! `EPOCH`: bumped after every change, so each tracked flow is decided once more against the
//! policy now in force.

use netwarden_common::EPOCH_INDEX;

use crate::{error::ApplyError, maps::ArrayMap};

/// The policy epoch.
pub(crate) struct Epoch {
    map: Box<dyn ArrayMap<u32>>,
}

impl Epoch {
    pub fn new(map: Box<dyn ArrayMap<u32>>) -> Self {
        Self { map }
    }

    /// Moves the epoch on: every tracked flow's next packet is decided again.
    pub fn bump(&mut self) -> Result<(), ApplyError> {
        let epoch = self.map.get(EPOCH_INDEX).unwrap_or(0).wrapping_add(1);
        self.map
            .set(EPOCH_INDEX, epoch)
            .map_err(|source| ApplyError::Epoch { source })
    }
}
