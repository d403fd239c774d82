{{/*
The alerts service's TOML config (services/alerts/src/config.rs, AlertsConfig):
alerts.config, with its rules as [[rules]] tables, plus what the chart owns: admin_listen
and the kafka table (the processor's Kafka security: vigil.kafka.properties).
*/}}
{{- define "vigil.alerts.config" -}}
{{- $al := .Values.alerts -}}
{{- $config := deepCopy $al.config -}}
{{- $_ := set $config "admin_listen" (printf "0.0.0.0:%d" (int $al.ports.metrics)) -}}
{{- $_ := set $config "kafka" (fromYaml (include "vigil.kafka.properties" .)) -}}
# Vigil alerts (services/alerts/src/config.rs, docs/alerts.md), from the Helm values
# alerts.config. Secrets come from the environment: ALERTS_KAFKA__SASL_*.
{{- include "vigil.toml.table" (dict "table" $config "path" list) }}
{{- end -}}
