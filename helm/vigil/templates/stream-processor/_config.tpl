{{/*
The stream processor's TOML config (services/stream-processor/src/config.rs,
ProcessorConfig): streamProcessor.config plus what the chart owns: admin_listen,
grpc_listen, the kafka table and model.endpoints.
*/}}
{{- define "vigil.streamProcessor.config" -}}
{{- $sp := .Values.streamProcessor -}}
{{- $config := deepCopy $sp.config -}}
{{- $_ := set $config "admin_listen" (printf "0.0.0.0:%d" (int $sp.ports.metrics)) -}}
{{- $_ := set $config "grpc_listen" (printf "0.0.0.0:%d" (int $sp.ports.grpc)) -}}
{{- $_ := set $config "kafka" (fromYaml (include "vigil.kafka.properties" .)) -}}
{{- $_ := set $config "consumer" (fromYaml (include "vigil.stringMap" $sp.config.consumer)) -}}
{{- $_ := set $config "producer" (fromYaml (include "vigil.stringMap" $sp.config.producer)) -}}
{{- $headless := include "vigil.componentName" (dict "root" . "component" "model-server-headless") -}}
{{- $endpoints := $sp.modelEndpoints | default (list (printf "http://%s:%d" $headless (int .Values.modelServer.ports.grpc))) -}}
{{- $_ := set $config.model "endpoints" $endpoints -}}
# Vigil stream processor (services/stream-processor/src/config.rs), from the Helm values
# streamProcessor.config. Secrets come from the environment: PROCESSOR_KAFKA__SASL_*.
{{- include "vigil.toml.table" (dict "table" $config "path" list) }}
{{- end -}}
