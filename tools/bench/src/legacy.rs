//! Reading reports of older schema versions into today's structs, so that a
//! report written by an older binary (a reference report from another
//! machine, one committed under `data/`) loads with the same values.
//!
//! Schema 1 wrote `roofline` as one flat object of 23 figures, with the
//! 8-row step's and the long decode's figures 0 when not measured; schema 2
//! grouped them ([`GroupedRoofline`]); schema 3 has the limits once and the
//! groups per dtype ([`Roofline`]). Schemas 1 and 2 measured f32 weights
//! only: what they lack (a test's dtype, the metadata's list of dtypes) is
//! read as f32, their per-mode recommendations and their one profile as f32's.
//! Schema 3 needs nothing here: what schema 4 added (`metadata.server`,
//! `tests[].itl_ms`, `raw[].token_ms`) is optional and reads as absent, as
//! are the fields added later within schema 4 (`metadata.prompt_tokens`,
//! `shared_prefix_tokens`, `choices` (read as 1), `prefix_cache_mib`,
//! `tests[].prefix`, `raw[].choice_ms`). Schema 4 needs nothing either: what
//! schema 5 added (`sweep`, `tests[].cell`, `analysis.targets[].cell`) is
//! optional and reads as absent, a run without a sweep.

use serde::{Deserialize, Deserializer};

use super::{
    Batch8Roofline, DecodeRoofline, DtypeProfile, DtypeRoofline, DtypeRun, PrefillRoofline, Recommendation,
    Roofline, RooflineLimits, StepRoofline,
};
use gpt2::profile::OpRow;

/// The dtype of everything a report before schema 3 measured.
const LEGACY_DTYPE: &str = "f32";

/// The dtype of a test, level, target or spread entry that names none.
pub fn f32_name() -> String {
    LEGACY_DTYPE.into()
}

/// Whether a target that does not say was required: before opt-in targets
/// existed, every target's miss failed the run.
pub fn required() -> bool {
    true
}

/// The choices per request of a report that does not say: one (before
/// `--choices` existed).
pub fn one() -> usize {
    1
}

/// The dtypes of a report whose metadata lists none: f32, its memory unknown.
pub fn f32_runs() -> Vec<DtypeRun> {
    vec![DtypeRun {
        dtype: f32_name(),
        packed_weight_bytes: None,
        rss_after_load_bytes: None,
        peak_rss_bytes: None,
        peak_rss_own: false,
    }]
}

/// A recommendation as schema 3 writes it, or schema 2's `[mode, concurrency]`.
#[derive(Deserialize)]
#[serde(untagged)]
enum AnyRecommendation {
    Dtyped(Recommendation),
    Pair(String, usize),
}

/// `Analysis::recommended_concurrency` from either layout (`deserialize_with`).
pub fn recommendations<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Recommendation>, D::Error> {
    let any = Vec::<AnyRecommendation>::deserialize(d)?;
    Ok(any
        .into_iter()
        .map(|r| match r {
            AnyRecommendation::Dtyped(r) => r,
            AnyRecommendation::Pair(mode, concurrency) => Recommendation {
                dtype: f32_name(),
                mode,
                concurrency,
            },
        })
        .collect())
}

/// `profile` as schema 3 writes it (per dtype), or schema 2's one table.
#[derive(Deserialize)]
#[serde(untagged)]
enum AnyProfile {
    Dtyped(Vec<DtypeProfile>),
    Rows(Vec<OpRow>),
}

/// `Report::profile` from either layout (`deserialize_with`).
pub fn profile<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<DtypeProfile>>, D::Error> {
    Ok(Option::<AnyProfile>::deserialize(d)?.map(|p| match p {
        AnyProfile::Dtyped(p) => p,
        AnyProfile::Rows(rows) => vec![DtypeProfile {
            dtype: f32_name(),
            rows,
        }],
    }))
}

/// `roofline` as schema 2 wrote it: the limits and one dtype's (f32's) parts.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct GroupedRoofline {
    pub limits: RooflineLimits,
    pub decode: DecodeRoofline,
    pub prefill: PrefillRoofline,
    #[serde(default)]
    pub long_decode: Option<StepRoofline>,
    #[serde(default)]
    pub batch8: Option<Batch8Roofline>,
}

impl From<GroupedRoofline> for Roofline {
    fn from(g: GroupedRoofline) -> Self {
        Roofline {
            limits: g.limits,
            dtypes: vec![DtypeRoofline {
                dtype: f32_name(),
                decode: g.decode,
                prefill: g.prefill,
                long_decode: g.long_decode,
                batch8: g.batch8,
            }],
        }
    }
}

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

impl From<FlatRoofline> for GroupedRoofline {
    fn from(f: FlatRoofline) -> Self {
        GroupedRoofline {
            limits: RooflineLimits {
                read_gbs_1t: f.read_gbs_1t,
                read_gbs_all: f.read_gbs_all,
                read_fma8_gbs_all: measured(f.read_fma8_gbs_all),
                fma_gflops_all: f.fma_gflops_all,
                linear_packed_gflops: f.sgemm_gflops,
            },
            decode: DecodeRoofline {
                read_gbs: None,
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
                peak: None,
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

/// Any layout of `roofline`: today's first, then schema 2's, then 1's.
#[derive(Deserialize)]
#[serde(untagged)]
enum AnyRoofline {
    Dtyped(Roofline),
    Grouped(GroupedRoofline),
    Flat(FlatRoofline),
}

/// `Report::roofline` from any layout (`deserialize_with`).
pub fn roofline<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Roofline>, D::Error> {
    Ok(Option::<AnyRoofline>::deserialize(d)?.map(|r| match r {
        AnyRoofline::Dtyped(r) => r,
        AnyRoofline::Grouped(g) => g.into(),
        AnyRoofline::Flat(f) => GroupedRoofline::from(f).into(),
    }))
}

#[cfg(test)]
mod tests {
    use super::super::Report;
    use super::*;

    /// A real schema-1 report: `throughput --levels 2 --requests-per-level 2
    /// --probe` at commit 47785a9 (dirty), on the 2-core development machine.
    const SCHEMA1: &str = include_str!("testdata/schema1_probe_report.json");

    /// A real schema-2 report: `throughput --weights <tiny synthetic>
    /// --levels 2 --requests-per-level 2 --single-requests 2 --warmup 1
    /// --max-new-tokens 4 --probe` at commit 226d794, same machine.
    const SCHEMA2: &str = include_str!("testdata/schema2_probe_report.json");

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
        let [d] = &r.dtypes[..] else {
            panic!("one dtype: {:?}", r.dtypes)
        };
        assert_eq!(d.dtype, "f32");
        assert_eq!(
            d.decode,
            DecodeRoofline {
                bytes_per_token: f("decode_bytes_per_token"),
                tokens_per_s: f("decode_tokens_per_s"),
                achieved_gbs: f("decode_achieved_gbs"),
                fraction_of_bandwidth: f("decode_fraction_of_bandwidth"),
                ceiling_tokens_per_s: f("decode_ceiling_tokens_per_s"),
                read_gbs: None,
            }
        );
        assert_eq!(
            d.prefill,
            PrefillRoofline {
                tokens: u("prefill_tokens"),
                ms: f("prefill_ms"),
                gflops: f("prefill_gflops"),
                fraction_of_fma_peak: f("prefill_fraction_of_fma_peak"),
                peak: None,
            }
        );
        assert_eq!(
            d.long_decode,
            Some(StepRoofline {
                position: u("long_decode_position"),
                step_ms: f("long_decode_step_ms"),
                achieved_gbs: f("long_decode_achieved_gbs"),
                fraction_of_bandwidth: f("long_decode_fraction_of_bandwidth"),
            })
        );
        assert_eq!(
            d.batch8,
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
        let d = &r.dtypes[0];
        assert_eq!(
            (&d.long_decode, &d.batch8, r.limits.read_fma8_gbs_all),
            (&None, &None, None)
        );
    }

    /// Schema 2 measured f32 alone and said so nowhere but in
    /// `metadata.model.dtype`: every test, level, target, spread entry,
    /// recommendation, the profile and the roofline read as f32's, with the
    /// figures as written.
    #[test]
    fn a_schema2_report_loads_as_f32() {
        let report: Report = serde_json::from_str(SCHEMA2).unwrap();
        assert_eq!(report.schema_version, 2);
        let raw: serde_json::Value = serde_json::from_str(SCHEMA2).unwrap();
        assert_eq!(raw["metadata"]["model"]["dtype"], "f32");
        assert_eq!(report.metadata.dtypes, f32_runs());
        assert_eq!(report.tests.len(), raw["tests"].as_array().unwrap().len());
        for (t, old) in report.tests.iter().zip(raw["tests"].as_array().unwrap()) {
            assert_eq!(t.dtype, "f32");
            assert_eq!(
                (t.mode.as_str(), t.tokens_per_s),
                (
                    old["mode"].as_str().unwrap(),
                    old["tokens_per_s"].as_f64().unwrap()
                )
            );
        }
        let a = &report.analysis;
        assert!(a.levels.iter().all(|l| l.dtype == "f32" && l.vs_f32.is_none()));
        assert!(a.targets.iter().all(|t| t.dtype == "f32"));
        assert!(a.spread.iter().all(|s| s.dtype == "f32"));
        let pairs = raw["analysis"]["recommended_concurrency"].as_array().unwrap();
        assert_eq!(a.recommended_concurrency.len(), pairs.len());
        for (r, pair) in a.recommended_concurrency.iter().zip(pairs) {
            assert_eq!(r.dtype, "f32");
            assert_eq!(r.mode, pair[0].as_str().unwrap());
            assert_eq!(r.concurrency as u64, pair[1].as_u64().unwrap());
        }
        let r = report.roofline.as_ref().expect("the report has a roofline");
        let old = &raw["roofline"];
        assert_eq!(
            r.limits.read_gbs_all,
            old["limits"]["read_gbs_all"].as_f64().unwrap()
        );
        let [d] = &r.dtypes[..] else {
            panic!("one dtype: {:?}", r.dtypes)
        };
        assert_eq!(d.dtype, "f32");
        assert_eq!(
            d.decode.bytes_per_token,
            old["decode"]["bytes_per_token"].as_f64().unwrap()
        );
        assert_eq!(
            d.batch8.as_ref().map(|b| b.step.step_ms),
            old["batch8"]["step_ms"].as_f64()
        );
        assert_eq!(
            d.long_decode.as_ref().map(|s| s.position as u64),
            old["long_decode"]["position"].as_u64()
        );

        // A schema-2 profile (one table) is f32's.
        let mut with_profile = raw.clone();
        with_profile["profile"] = serde_json::json!([{
            "phase": "decode", "op": "qkv", "ms": 1.5, "share": 0.5, "calls": 3,
            "gb_per_s": 10.0, "gflop_per_s": 20.0
        }]);
        let report: Report = serde_json::from_value(with_profile).unwrap();
        let p = report.profile.expect("a profile");
        assert_eq!((p.len(), p[0].dtype.as_str(), p[0].rows.len()), (1, "f32", 1));
        assert_eq!(p[0].rows[0].op, "qkv");
    }

    /// A schema-3 report (today's layout without the server and the token
    /// times) reads with no ITL and no server, its model shape kept.
    #[test]
    fn a_schema3_report_loads_without_itl() {
        let report: Report = serde_json::from_str(SCHEMA2).unwrap();
        let mut v = serde_json::to_value(&report).unwrap();
        v["schema_version"] = 3.into();
        for t in v["tests"].as_array_mut().unwrap() {
            t.as_object_mut().unwrap().remove("itl_ms");
        }
        let json = v.to_string();
        assert!(!json.contains("itl_ms") && !json.contains("token_ms") && !json.contains("\"server\""));
        let old: Report = serde_json::from_str(&json).unwrap();
        assert!(old
            .tests
            .iter()
            .all(|t| t.itl_ms.is_none() && t.raw.iter().all(|r| r.token_ms.is_empty())));
        assert_eq!(old.metadata.server, None);
        assert_eq!(old.metadata.model, report.metadata.model);
        assert!(old.metadata.model.is_some());
    }

    /// A schema-4 report (no sweep, no cells) reads as a run without a
    /// sweep; today's writes neither field when there is no sweep.
    #[test]
    fn a_schema4_report_loads_without_a_sweep() {
        let report: Report = serde_json::from_str(SCHEMA2).unwrap();
        let mut v = serde_json::to_value(&report).unwrap();
        v["schema_version"] = 4.into();
        let json = v.to_string();
        assert!(
            !json.contains("\"sweep\"") && !json.contains("\"cell\""),
            "{json}"
        );
        let old: Report = serde_json::from_str(&json).unwrap();
        assert_eq!(old.sweep, None);
        assert!(old.tests.iter().all(|t| t.cell.is_none()));
        assert!(old.analysis.targets.iter().all(|t| t.cell.is_none()));
        assert_eq!(old.tests, report.tests);
    }

    #[test]
    fn todays_layout_round_trips() {
        for old in [SCHEMA1, SCHEMA2] {
            let report: Report = serde_json::from_str(old).unwrap();
            let json = serde_json::to_string(&report).unwrap();
            assert!(
                json.contains("\"limits\":{")
                    && json.contains("\"dtypes\":[{\"dtype\":\"f32\"")
                    && !json.contains("sgemm_gflops"),
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
}
