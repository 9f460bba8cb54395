//! `envoy.filters.http.grpc_stats` (Envoy
//! `extensions.filters.http.grpc_stats.v3.FilterConfig`).

/// Which gRPC methods get their own stats.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum MethodStats {
    /// Every call counts in the generic `grpc.*` stats (Envoy's default and
    /// `stats_for_all_methods: false`).
    #[default]
    None,
    /// `stats_for_all_methods: true`: every method by its name.
    All,
    /// `individual_method_stats_allowlist`: these `(service, method)` pairs;
    /// any other call counts in the generic stats.
    Allowlist(Vec<(String, String)>),
}

/// The gRPC statistics filter's configuration.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GrpcStats {
    /// `emit_filter_state`: accepted; mesh has no reader of Envoy filter state.
    pub emit_filter_state: bool,
    /// `stats_for_all_methods` / `individual_method_stats_allowlist`.
    pub methods: MethodStats,
    /// `replace_dots_in_grpc_service_name`: `_` for `.` in service names.
    pub replace_dots_in_grpc_service_name: bool,
}
