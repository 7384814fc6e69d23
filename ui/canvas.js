// A drawing surface for one digit: round thick white strokes on black, like MNIST.
// Pointer events cover mouse, pen and touch; `touch-action: none` keeps the page from scrolling.
// After every finished stroke, undo or clear it emits `change` with the PNG data URL (null when empty).
// The strokes are kept in the tab's sessionStorage: a reload (NiceGUI reloads the page when it
// reconnects to a restarted server) draws them again and sends them, so a drawing in progress stays.
export default {
  template: `
    <canvas ref="canvas" :width="size" :height="size" data-testid="digit-canvas"
      style="touch-action: none; cursor: crosshair; background: #000; border-radius: 8px;
             width: 100%; max-width: 100%; aspect-ratio: 1 / 1; display: block;"></canvas>`,
  props: {
    size: { type: Number, default: 280 },
    lineWidth: { type: Number, default: 20 },
    storageKey: { type: String, default: "digit-canvas" },
  },
  mounted() {
    this.strokes = this.restore();
    this.current = null;
    const canvas = this.$refs.canvas;
    this.ctx = canvas.getContext("2d");
    this.redraw();
    canvas.dataset.strokes = this.strokes.length;
    if (this.strokes.length) this.whenConnected(this.emitChange); // a drawing kept from before the reload
    canvas.addEventListener("pointerdown", this.onDown);
    canvas.addEventListener("pointermove", this.onMove);
    canvas.addEventListener("pointerup", this.onUp);
    canvas.addEventListener("pointercancel", this.onUp);
    canvas.addEventListener("lostpointercapture", this.onUp);
  },
  unmounted() {
    const canvas = this.$refs.canvas;
    if (!canvas) return;
    canvas.removeEventListener("pointerdown", this.onDown);
    canvas.removeEventListener("pointermove", this.onMove);
    canvas.removeEventListener("pointerup", this.onUp);
    canvas.removeEventListener("pointercancel", this.onUp);
    canvas.removeEventListener("lostpointercapture", this.onUp);
  },
  methods: {
    point(event) {
      const rect = this.$refs.canvas.getBoundingClientRect();
      return [((event.clientX - rect.left) * this.size) / rect.width, ((event.clientY - rect.top) * this.size) / rect.height];
    },
    onDown(event) {
      if (event.button !== undefined && event.button > 0) return;
      event.preventDefault();
      this.$refs.canvas.setPointerCapture(event.pointerId);
      this.current = { id: event.pointerId, points: [this.point(event)] };
      this.strokes.push(this.current.points);
      this.drawDot(this.current.points[0]);
    },
    onMove(event) {
      if (!this.current || event.pointerId !== this.current.id) return;
      event.preventDefault();
      const events = event.getCoalescedEvents ? event.getCoalescedEvents() : [event];
      for (const e of events.length ? events : [event]) {
        const points = this.current.points;
        const p = this.point(e);
        this.drawSegment(points[points.length - 1], p);
        points.push(p);
      }
    },
    onUp(event) {
      if (!this.current || event.pointerId !== this.current.id) return;
      this.current = null;
      this.emitChange();
    },
    style() {
      const ctx = this.ctx;
      ctx.strokeStyle = "#fff";
      ctx.fillStyle = "#fff";
      ctx.lineWidth = this.lineWidth;
      ctx.lineCap = "round";
      ctx.lineJoin = "round";
    },
    drawDot(p) {
      this.style();
      this.ctx.beginPath();
      this.ctx.arc(p[0], p[1], this.lineWidth / 2, 0, 2 * Math.PI);
      this.ctx.fill();
    },
    drawSegment(a, b) {
      this.style();
      this.ctx.beginPath();
      this.ctx.moveTo(a[0], a[1]);
      this.ctx.lineTo(b[0], b[1]);
      this.ctx.stroke();
    },
    redraw() {
      const ctx = this.ctx;
      ctx.fillStyle = "#000";
      ctx.fillRect(0, 0, this.size, this.size);
      for (const points of this.strokes) {
        this.drawDot(points[0]);
        for (let i = 1; i < points.length; i++) this.drawSegment(points[i - 1], points[i]);
      }
    },
    emitChange() {
      this.keep();
      this.$emit("change", { png: this.exportPng(), strokes: this.strokes.length });
    },
    whenConnected(fn, tries = 300) {
      // Events sent before NiceGUI's handshake would be lost: wait for it (at most a minute).
      if (window.did_handshake) fn();
      else if (tries > 0) setTimeout(() => this.whenConnected(fn, tries - 1), 200);
    },
    keep() {
      this.$refs.canvas.dataset.strokes = this.strokes.length; // for the browser tests
      try {
        if (this.strokes.length) sessionStorage.setItem(this.storageKey, JSON.stringify(this.strokes));
        else sessionStorage.removeItem(this.storageKey);
      } catch (e) {
        // storage full or disabled: the drawing is only lost on a reload
      }
    },
    restore() {
      try {
        const kept = JSON.parse(sessionStorage.getItem(this.storageKey) || "[]");
        const isPoint = (p) => Array.isArray(p) && p.length === 2 && p.every(Number.isFinite);
        if (Array.isArray(kept) && kept.every((s) => Array.isArray(s) && s.length && s.every(isPoint))) return kept;
      } catch (e) {
        // unreadable: start empty
      }
      return [];
    },
    exportPng() {
      return this.strokes.length ? this.$refs.canvas.toDataURL("image/png") : null;
    },
    strokeCount() {
      return this.strokes.length;
    },
    undo() {
      if (!this.strokes.length) return;
      this.strokes.pop();
      this.current = null;
      this.redraw();
      this.emitChange();
    },
    clear() {
      this.strokes = [];
      this.current = null;
      this.redraw();
      this.emitChange();
    },
  },
};
