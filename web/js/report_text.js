// Shows the text a node returns in its "ui" ({"ui": {"text": [...]}}) in a read-only box on the node:
// the ItD Prompt Classifier's calibration report, the ItD Prompt Gate's per-chunk decisions, the Erasure
// Report's scores and RECE Edit Model's per-layer weight change.
import { app } from "../../scripts/app.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

const NODES = new Set(["CE_ItDPromptClassifier", "CE_ItDPromptGate", "CE_ErasureReport", "CE_RECEEditModel", "CE_ConceptInversionProbe", "CE_SAeUronFiringMap"]);
const WIDGET = "ce_report_view";

app.registerExtension({
  name: "concept_erasure.ReportText",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!NODES.has(nodeData.name)) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const text = (message?.text ?? []).join("\n");
      let widget = this.widgets?.find((w) => w.name === WIDGET);
      if (!widget) {
        widget = ComfyWidgets.STRING(this, WIDGET, ["STRING", { multiline: true }], app).widget;
        widget.serialize = false; // a view, not an input: never stored among the workflow's widget values
        widget.options = { ...(widget.options ?? {}), serialize: false };
        if (widget.inputEl) {
          widget.inputEl.readOnly = true;
          widget.inputEl.style.opacity = 0.75;
        }
      }
      widget.value = text;
      this.setDirtyCanvas?.(true, true);
    };
  },
});
