//! Harness for cluster tests: a PKI, config files and `rampart serve` processes on loopback.
