//! One helper for the std mutexes the daemon holds for a few instructions (never across an
//! `.await`): a leaf every layer may use.

use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Locks `m`. A poisoned lock means a panic while it was held; nothing that holds these locks
/// can panic half way through a change, so the data is still consistent and is used as it is.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Reads `l` (a poisoned lock is used as it is, as in [`lock`]).
pub fn read<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|p| p.into_inner())
}

/// Writes `l` (a poisoned lock is used as it is, as in [`lock`]).
pub fn write<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|p| p.into_inner())
}
