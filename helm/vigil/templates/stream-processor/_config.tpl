{{/*
The stream processor's TOML config (services/stream-processor/src/config.rs,
ProcessorConfig): streamProcessor.config plus what the chart owns: admin_listen,
grpc_listen, the kafka table, model.endpoints and, with the model server's TLS on,
model.tls_ca_file (the CA of its Secret).
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
{{- $tls := include "vigil.modelServer.tls" . -}}
{{- $scheme := ternary "https" "http" (not (empty $tls)) -}}
{{- $endpoints := $sp.modelEndpoints | default (list (printf "%s://%s:%d" $scheme $headless (int .Values.modelServer.ports.grpc))) -}}
{{- $_ := set $config.model "endpoints" $endpoints -}}
{{- if $tls -}}
{{- $_ := set $config.model "tls_ca_file" (printf "%s/%s" (include "vigil.modelServer.tlsDir" .) .Values.modelServer.security.tls.caKey) -}}
{{- end -}}
# Vigil stream processor (services/stream-processor/src/config.rs), from the Helm values
# streamProcessor.config. Secrets come from the environment: PROCESSOR_KAFKA__SASL_*.
{{- include "vigil.toml.table" (dict "table" $config "path" list) }}
{{- end -}}
