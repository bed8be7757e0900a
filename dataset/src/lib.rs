//! cairn-dataset: thin-provisioned volumes (datasets) built on the pool's object layer.
//!
//! Not yet implemented: volumes, snapshots and clones arrive with the volumes issue. The crate exists so
//! the workspace has the layout of SPEC section 1 from the start.
