//! Calibration statistics: what forward hooks see at the inputs (and outputs) of Linear layers,
//! reduced to a few numbers per column, and the SmoothQuant scale migration computed from them.
//!
//! Python owns the hooks and the module walking; every element-wise reduction lives here and runs
//! with the GIL released. State is kept in caller-owned arrays (f64 sums, f32 extremes, u64
//! histogram counts), so a checkpoint is just those arrays and a resumed run continues bit-exactly:
//! each batch is reduced on its own (in a fixed order per column) and then added to the running
//! totals, so the result depends only on the sequence of batches, never on the thread count.

pub mod histogram;
pub mod smooth;
pub mod stats;
