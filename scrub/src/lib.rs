//! cairn-scrub: the scan engine (scrub and resilver) over a pool's block tree.
//!
//! Not yet implemented: scrub, resilver and scheduled scrubs arrive with their own issue. The crate exists
//! so the workspace has the layout of SPEC section 1 from the start.
