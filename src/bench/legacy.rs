//! Reading reports of older schema versions into today's structs.
//!
//! Schema 1 wrote `roofline` as one flat object of 23 figures, with the
//! 8-row step's and the long decode's figures 0 when not measured; schema 2
//! groups them ([`Roofline`]). [`roofline`] reads either layout, so a report
//! written by an older binary (a reference report from another machine, one
//! committed under `data/`) loads with the same values.

use serde::{Deserialize, Deserializer};

use super::{Batch8Roofline, DecodeRoofline, PrefillRoofline, Roofline, RooflineLimits, StepRoofline};

/// `roofline` as schema 1 wrote it. Fields after `prefill_fraction_of_fma_peak`
/// were added during schema 1 and are 0 in the reports written before them.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct FlatRoofline {
    pub read_gbs_1t: f64,
    pub read_gbs_all: f64,
    pub fma_gflops_all: f64,
    /// Our `linear_packed` at M = 128 (named after SGEMM then).
    pub sgemm_gflops: f64,
    pub decode_bytes_per_token: f64,
    pub decode_tokens_per_s: f64,
    pub decode_achieved_gbs: f64,
    pub decode_fraction_of_bandwidth: f64,
    pub decode_ceiling_tokens_per_s: f64,
    pub prefill_tokens: usize,
    pub prefill_ms: f64,
    pub prefill_gflops: f64,
    pub prefill_fraction_of_fma_peak: f64,
    #[serde(default)]
    pub read_fma8_gbs_all: f64,
    #[serde(default)]
    pub batch8_step_ms: f64,
    #[serde(default)]
    pub batch8_position: usize,
    #[serde(default)]
    pub batch8_achieved_gbs: f64,
    #[serde(default)]
    pub batch8_fraction_of_bandwidth: f64,
    #[serde(default)]
    pub batch8_compute_ms: f64,
    #[serde(default)]
    pub long_decode_step_ms: f64,
    #[serde(default)]
    pub long_decode_position: usize,
    #[serde(default)]
    pub long_decode_achieved_gbs: f64,
    #[serde(default)]
    pub long_decode_fraction_of_bandwidth: f64,
}

/// A figure schema 1 wrote as 0 when it was not measured.
fn measured(x: f64) -> Option<f64> {
    (x > 0.0).then_some(x)
}

impl From<FlatRoofline> for Roofline {
    fn from(f: FlatRoofline) -> Self {
        Roofline {
            limits: RooflineLimits {
                read_gbs_1t: f.read_gbs_1t,
                read_gbs_all: f.read_gbs_all,
                read_fma8_gbs_all: measured(f.read_fma8_gbs_all),
                fma_gflops_all: f.fma_gflops_all,
                linear_packed_gflops: f.sgemm_gflops,
            },
            decode: DecodeRoofline {
                bytes_per_token: f.decode_bytes_per_token,
                tokens_per_s: f.decode_tokens_per_s,
                achieved_gbs: f.decode_achieved_gbs,
                fraction_of_bandwidth: f.decode_fraction_of_bandwidth,
                ceiling_tokens_per_s: f.decode_ceiling_tokens_per_s,
            },
            prefill: PrefillRoofline {
                tokens: f.prefill_tokens,
                ms: f.prefill_ms,
                gflops: f.prefill_gflops,
                fraction_of_fma_peak: f.prefill_fraction_of_fma_peak,
            },
            long_decode: measured(f.long_decode_step_ms).map(|step_ms| StepRoofline {
                position: f.long_decode_position,
                step_ms,
                achieved_gbs: f.long_decode_achieved_gbs,
                fraction_of_bandwidth: f.long_decode_fraction_of_bandwidth,
            }),
            batch8: measured(f.batch8_step_ms).map(|step_ms| Batch8Roofline {
                step: StepRoofline {
                    position: f.batch8_position,
                    step_ms,
                    achieved_gbs: f.batch8_achieved_gbs,
                    fraction_of_bandwidth: f.batch8_fraction_of_bandwidth,
                },
                compute_ms: measured(f.batch8_compute_ms),
            }),
        }
    }
}

/// Either layout of `roofline`: today's first, then schema 1's.
#[derive(Deserialize)]
#[serde(untagged)]
enum AnyRoofline {
    Grouped(Roofline),
    Flat(FlatRoofline),
}

/// `Report::roofline` from either layout (`deserialize_with`).
pub fn roofline<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Roofline>, D::Error> {
    Ok(Option::<AnyRoofline>::deserialize(d)?.map(|r| match r {
        AnyRoofline::Grouped(r) => r,
        AnyRoofline::Flat(f) => f.into(),
    }))
}

#[cfg(test)]
mod tests {
    use super::super::Report;
    use super::*;

    /// A real schema-1 report: `throughput --levels 2 --requests-per-level 2
    /// --probe` at commit 47785a9 (dirty), on the 2-core development machine.
    const SCHEMA1: &str = include_str!("testdata/schema1_probe_report.json");

    #[test]
    fn a_schema1_report_loads_with_the_same_values() {
        let report: Report = serde_json::from_str(SCHEMA1).unwrap();
        assert_eq!(report.schema_version, 1);
        let flat: serde_json::Value = serde_json::from_str(SCHEMA1).unwrap();
        let old = &flat["roofline"];
        let f = |k: &str| old[k].as_f64().unwrap_or_else(|| panic!("{k}"));
        let u = |k: &str| old[k].as_u64().unwrap_or_else(|| panic!("{k}")) as usize;
        let r = report.roofline.expect("the report has a roofline");
        assert_eq!(
            r.limits,
            RooflineLimits {
                read_gbs_1t: f("read_gbs_1t"),
                read_gbs_all: f("read_gbs_all"),
                read_fma8_gbs_all: Some(f("read_fma8_gbs_all")),
                fma_gflops_all: f("fma_gflops_all"),
                linear_packed_gflops: f("sgemm_gflops"),
            }
        );
        assert_eq!(
            r.decode,
            DecodeRoofline {
                bytes_per_token: f("decode_bytes_per_token"),
                tokens_per_s: f("decode_tokens_per_s"),
                achieved_gbs: f("decode_achieved_gbs"),
                fraction_of_bandwidth: f("decode_fraction_of_bandwidth"),
                ceiling_tokens_per_s: f("decode_ceiling_tokens_per_s"),
            }
        );
        assert_eq!(
            r.prefill,
            PrefillRoofline {
                tokens: u("prefill_tokens"),
                ms: f("prefill_ms"),
                gflops: f("prefill_gflops"),
                fraction_of_fma_peak: f("prefill_fraction_of_fma_peak"),
            }
        );
        assert_eq!(
            r.long_decode,
            Some(StepRoofline {
                position: u("long_decode_position"),
                step_ms: f("long_decode_step_ms"),
                achieved_gbs: f("long_decode_achieved_gbs"),
                fraction_of_bandwidth: f("long_decode_fraction_of_bandwidth"),
            })
        );
        assert_eq!(
            r.batch8,
            Some(Batch8Roofline {
                step: StepRoofline {
                    position: u("batch8_position"),
                    step_ms: f("batch8_step_ms"),
                    achieved_gbs: f("batch8_achieved_gbs"),
                    fraction_of_bandwidth: f("batch8_fraction_of_bandwidth"),
                },
                compute_ms: Some(f("batch8_compute_ms")),
            })
        );
        // Everything else in the report is as it was written.
        assert_eq!(report.tests.len(), flat["tests"].as_array().unwrap().len());
        assert_eq!(
            report.metadata.git_commit,
            flat["metadata"]["git_commit"].as_str().unwrap()
        );
    }

    #[test]
    fn schema1_figures_it_lacked_are_none() {
        // The oldest schema-1 roofline: no 8-row step, no long decode.
        let mut flat: serde_json::Value = serde_json::from_str(SCHEMA1).unwrap();
        let old = flat["roofline"].as_object_mut().unwrap();
        old.retain(|k, _| {
            !k.starts_with("batch8_") && !k.starts_with("long_decode_") && k != "read_fma8_gbs_all"
        });
        let report: Report = serde_json::from_value(flat).unwrap();
        let r = report.roofline.unwrap();
        assert_eq!(
            (r.long_decode, r.batch8, r.limits.read_fma8_gbs_all),
            (None, None, None)
        );
    }

    #[test]
    fn todays_layout_round_trips() {
        let report: Report = serde_json::from_str(SCHEMA1).unwrap();
        let json = serde_json::to_string(&report).unwrap();
        assert!(
            json.contains("\"limits\":{") && !json.contains("sgemm_gflops"),
            "{json}"
        );
        let back: Report = serde_json::from_str(&json).unwrap();
        assert_eq!(back, report);
        let mut without = report.clone();
        without.roofline = None;
        let back: Report = serde_json::from_str(&serde_json::to_string(&without).unwrap()).unwrap();
        assert_eq!(back.roofline, None);
    }
}
