//! Prices per billing unit, for the cost column of usage reports.

use std::collections::BTreeMap;

use super::Config;

impl Config {
    /// Model name → price of one billing unit (currency-neutral: whatever
    /// currency the operator writes prices in). A report row's `cost` is its
    /// units times its model's price; models without a price have no cost.
    /// From the model table (`[[models]]` `price_per_unit` over the
    /// built-in list prices).
    pub(crate) fn unit_prices(&self) -> BTreeMap<String, f64> {
        self.models.unit_prices()
    }
}
