//! punch
