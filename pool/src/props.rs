//! Pool properties: which exist, which can be set, and how values are validated.
//!
//! User-set values are stored in the pool's props object (a bincode map inside a checksummed block);
//! read-only values are computed. Sizes arrive here already converted to bytes by the caller.

use crate::error::{PoolError, Result};

/// A property definition.
pub struct PropDef {
    pub name: &'static str,
    pub settable: bool,
    pub default: &'static str,
}

pub const PROPS: &[PropDef] = &[
    PropDef {
        name: "name",
        settable: false,
        default: "",
    },
    PropDef {
        name: "size",
        settable: false,
        default: "",
    },
    PropDef {
        name: "capacity",
        settable: false,
        default: "",
    },
    PropDef {
        name: "allocated",
        settable: false,
        default: "",
    },
    PropDef {
        name: "free",
        settable: false,
        default: "",
    },
    PropDef {
        name: "fragmentation",
        settable: false,
        default: "-",
    },
    PropDef {
        name: "freeing",
        settable: false,
        default: "0",
    },
    PropDef {
        name: "health",
        settable: false,
        default: "",
    },
    PropDef {
        name: "guid",
        settable: false,
        default: "",
    },
    PropDef {
        name: "txg",
        settable: false,
        default: "",
    },
    PropDef {
        name: "ashift",
        settable: false,
        default: "12",
    },
    PropDef {
        name: "comment",
        settable: true,
        default: "-",
    },
    PropDef {
        name: "scrub_schedule",
        settable: true,
        default: "off",
    },
    PropDef {
        name: "scrub_rate_limit",
        settable: true,
        default: "0",
    },
    PropDef {
        name: "autotrim",
        settable: true,
        default: "on",
    },
    PropDef {
        name: crate::slowio::PROP,
        settable: true,
        // `cairn_vdev::dispatch::DEFAULT_SLOW_MS`
        default: "10s",
    },
];

pub fn find(name: &str) -> Option<&'static PropDef> {
    PROPS.iter().find(|p| p.name == name)
}

/// Validate (and normalise) a value for a settable property.
pub fn validate(name: &str, value: &str) -> Result<String> {
    let Some(def) = find(name) else {
        return Err(PoolError::Invalid(format!("invalid property '{name}'")));
    };
    if !def.settable {
        return Err(PoolError::Invalid(format!("property '{name}' is readonly")));
    }
    match name {
        "comment" => {
            if value.len() > 8192 {
                return Err(PoolError::Invalid(
                    "comment is too long (max 8192 bytes)".into(),
                ));
            }
            if value.chars().any(|c| c.is_control()) {
                return Err(PoolError::Invalid(
                    "comment contains control characters".into(),
                ));
            }
            Ok(value.to_string())
        }
        "autotrim" => match value {
            "on" | "off" => Ok(value.to_string()),
            _ => Err(PoolError::Invalid(format!(
                "invalid autotrim '{value}': expected on or off"
            ))),
        },
        "scrub_schedule" => validate_schedule(value).map(|()| value.to_string()),
        crate::slowio::PROP => crate::slowio::parse(value).map(|_| value.to_string()),
        "scrub_rate_limit" => value.parse::<u64>().map(|v| v.to_string()).map_err(|_| {
            PoolError::Invalid(format!("invalid scrub_rate_limit '{value}': not a size"))
        }),
        _ => Ok(value.to_string()),
    }
}

/// `off`, `daily`, `weekly`, `monthly`, an interval `N[smhdw]`, or a 5-field cron line: exactly what
/// the scheduler ([`crate::schedule`]) can run.
pub fn validate_schedule(v: &str) -> Result<()> {
    if crate::schedule::valid(v) {
        Ok(())
    } else {
        Err(PoolError::Invalid(format!(
            "invalid scrub_schedule '{v}': expected off, daily, weekly, monthly, an interval like \
             7d, or a 5-field cron line (month names in the month field, day names in the last)"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules() {
        for ok in [
            "off",
            "weekly",
            "7d",
            "12h",
            "0 3 * * 0",
            "*/15 * * * mon-fri",
            "0 0 1 jan *",
        ] {
            validate_schedule(ok).unwrap();
        }
        for bad in [
            "",
            "0d",
            "sometimes",
            "0 3 * *",
            "61 * * * *",
            "* * * * * *",
            "*/0 * * * *",
        ] {
            assert!(validate_schedule(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn readonly_and_unknown() {
        assert!(validate("size", "1").is_err());
        assert!(validate("bogus", "1").is_err());
        assert!(validate("scrub_rate_limit", "abc").is_err());
        assert_eq!(validate("scrub_rate_limit", "1048576").unwrap(), "1048576");
        assert_eq!(validate("slow_io_deadline", "2s").unwrap(), "2s");
        assert!(validate("slow_io_deadline", "soon").is_err());
        assert_eq!(
            find("slow_io_deadline").unwrap().default,
            crate::slowio::default_str()
        );
    }
}
