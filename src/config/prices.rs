//! Prices per billing unit, for the cost column of usage reports.

use std::collections::BTreeMap;

use super::Config;

impl Config {
    /// Model name → price of one billing unit (currency-neutral: whatever
    /// currency the operator writes prices in). A report row's `cost` is its
    /// units times its model's price; models without a price have no cost.
    ///
    /// Empty for now: the model table (`[[models]]`, each model's price per
    /// unit) fills it.
    pub(crate) fn unit_prices(&self) -> BTreeMap<String, f64> {
        BTreeMap::new()
    }
}
