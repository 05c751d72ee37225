//! READ receipts for stored messages: the dedup record (1:1) or the member
//! receipt (group) moves to READ, and the sender gets a stored STATUS READ.
//! Only a message that was delivered to the reader, and whose SEND asked for
//! READ_RECEIPT, gives one; anything else is ignored.

use super::pass::Pass;
use crate::directory::User;
use crate::store::keys::{dedup_key, member_receipt_key};
use crate::store::record::{RECEIPT_DELIVERED, RECEIPT_QUEUED, RECEIPT_READ};
use crate::store::Result;
use crate::wire::{flags, is_valid_address, StatusCode};

impl Pass<'_> {
    pub(super) fn read(&mut self, reader: &User, from: &str, id: u64) -> Result<()> {
        if id == 0 || !is_valid_address(from) {
            return Ok(());
        }
        let key = dedup_key(from, id);
        let Some(mut d) = self.get_dedup(&key)? else {
            return Ok(());
        };
        let delivered = match d.status {
            StatusCode::DELIVERED => true,
            StatusCode::SENT => reader.inflight().contains_key(&d.seq),
            _ => false,
        };
        if d.recipient != *reader.address || d.flags & flags::READ_RECEIPT == 0 || !delivered {
            return Ok(());
        }
        d.status = StatusCode::READ;
        self.put_dedup(key, d)?;
        let to = Some(&*reader.address);
        self.store_status(from, id, to, None, None, StatusCode::READ)
    }

    pub(super) fn group_read(
        &mut self,
        reader: &User,
        from: &str,
        id: u64,
        group: &str,
    ) -> Result<()> {
        if id == 0 || !is_valid_address(from) || !is_valid_address(group) {
            return Ok(());
        }
        match self.get_dedup(&dedup_key(from, id))? {
            Some(d) if d.recipient == group && d.flags & flags::READ_RECEIPT != 0 => {}
            _ => return Ok(()),
        }
        let key = member_receipt_key(from, id, &reader.address);
        let seq = match self.get_receipt(&key)? {
            Some((seq, RECEIPT_DELIVERED)) => seq,
            Some((seq, RECEIPT_QUEUED)) if reader.inflight().contains_key(&seq) => seq,
            _ => return Ok(()),
        };
        self.put_receipt(key, seq, RECEIPT_READ)?;
        let member = Some(&*reader.address);
        self.store_status(from, id, None, Some(group), member, StatusCode::READ)
    }
}
