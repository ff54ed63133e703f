// The shop-app story through the generated Kotlin bindings on the JVM (JNA),
// against a real coordinator: the same story as ../story.py. Compiled with
// kotlinc and run by ffi/tests/kotlin.rs, which generates the bindings,
// starts the coordinators and passes FEDREC_ENDPOINT, FEDREC_TLS_ENDPOINT
// (a TLS coordinator), FEDREC_OTHER_CA (a CA that did not sign its
// certificate), FEDREC_DIR and FEDREC_ITEMS (the catalogue's size, which the
// app does not supply: only the bad-input checks use it). Prints
// "story: ok" at the end. The block between "README:start" and
// "README:end" is the README's Kotlin snippet (the test checks they agree).

import uniffi.fedrec_ffi.*
import java.io.File

val ENDPOINT = System.getenv("FEDREC_ENDPOINT")!!
val TLS_ENDPOINT = System.getenv("FEDREC_TLS_ENDPOINT")!!
val OTHER_CA = System.getenv("FEDREC_OTHER_CA")!!
val DIR = System.getenv("FEDREC_DIR")!!
val ITEMS = System.getenv("FEDREC_ITEMS")!!.toUInt()
val KEY = ByteArray(32) { it.toByte() }
val NOW = System.currentTimeMillis() / 1000

fun check(condition: Boolean, what: () -> Any?) {
    if (!condition) throw AssertionError(what().toString())
}

/** Asserts that `call` throws the typed error `T`, and returns it. */
inline fun <reified T : FedrecException> expect(what: String, call: () -> Unit): T {
    try {
        call()
    } catch (e: FedrecException) {
        if (e is T) {
            check(!e.message.isNullOrEmpty()) { "$what: an error carries a message" }
            return e
        }
        throw AssertionError("$what: expected ${T::class.simpleName}, got $e")
    }
    throw AssertionError("$what: expected ${T::class.simpleName}, got no error")
}

/** The app's view of the device: on battery until plugged in. */
class Phone : DeviceConditions {
    @Volatile var charging = false
    @Volatile var broken = false

    override fun current(): DeviceState {
        if (broken) throw RuntimeException("the app's battery check failed")
        return DeviceState(idle = true, charging = charging, unmetered = true)
    }
}

fun options(path: String, key: ByteArray = KEY) =
    OpenOptions(storePath = path, storeKey = key, seed = 7uL)

fun story(): String {
    val phone = Phone()
    val path = File(DIR, "shop.store").path
    // README:start
    // On a background thread (a WorkManager worker, Dispatchers.IO):
    val app = FedrecClient.open(
        OpenOptions(storePath = path, storeKey = KEY, seed = 7uL), // key from the Android Keystore
        phone, // DeviceConditions: idle, charging, unmetered (WorkManager constraints)
    )
    app.connect(ENDPOINT, null) // learns the catalogue and the model's shape (stored)
    val firstVersion = app.refreshModel() // the global model, for ranking on the device
    val popular = app.recommend(5) // before consent: the popular items
    app.setConsent(Consent.ON_DEVICE)
    app.record(Purchase(item = 10u, time = NOW, quantity = 1.0f))
    val rows = app.recommend(5) // discover, buyAgain, blended: computed on the phone
    app.setConsent(Consent.FEDERATED)
    val summary = app.participate() // one round if the phone is eligible
    val report = app.transparencyText() // for the settings screen
    // README:end
    check(popular.basis == Basis.POPULAR_NO_CONSENT && popular.discover.size == 5) { popular }
    check(rows.basis == Basis.PERSONAL && 10u !in rows.discover) { rows }
    check(rows.buyAgain == listOf(10u)) { rows }
    check(summary.trained == 0u && "not charging" in summary.finishedReason) { summary }
    check(report.lines().size > 3) { report }
    check(app.modelVersion() == firstVersion) { "model version" }
    app.forgetMe()
    app.setConsent(Consent.NONE)

    // Before consent: popular items, nothing stored.
    check(app.record(Purchase(item = 1u, time = NOW, quantity = 1.0f)) == Recorded.NOT_STORED) { "not stored" }

    // On-device consent: purchases kept for personal recommendations.
    val change = app.setConsent(Consent.ON_DEVICE)
    check(change.previous == Consent.NONE && change.current == Consent.ON_DEVICE) { change }
    val liked = listOf(10u, 12u, 13u, 15u, 17u, 18u)
    liked.forEachIndexed { i, item ->
        val got = app.record(Purchase(item = item, time = NOW - 3600L * i, quantity = 1.0f))
        check(got == Recorded.STORED) { got }
    }
    app.record(Purchase(item = 40u, time = NOW, quantity = 1.0f, tag = "gift"))
    check(app.exclude(Exclusion.Tag(tag = "gift"))) { "a new exclusion" }
    check(app.exclusions() == listOf(Exclusion.Tag(tag = "gift"))) { app.exclusions() }
    var personal = app.recommend(5)
    check(personal.basis == Basis.PERSONAL) { personal }
    check(personal.discover.size == 5 && personal.discover.none { it in liked }) { personal }
    check(liked.containsAll(personal.buyAgain) && personal.blended.size == 5) { personal }
    expect<FedrecException.ConsentRequired>("participate on device") { app.participate() }

    // Federated: train only when the app says the phone may.
    app.setConsent(Consent.FEDERATED)
    val waiting = app.participate()
    check(waiting.trained == 0u && "not charging" in waiting.finishedReason) { waiting }
    phone.broken = true // the app's own callback throws: a typed error, no crash
    expect<FedrecException.Internal>("a throwing callback") { app.participate() }
    phone.broken = false
    phone.charging = true
    repeat(2) {
        val s = app.participate()
        check(s.trained == 1u) { s }
    }

    // After training: a newer model, personal rows, an explanation.
    check(app.refreshModel() > firstVersion) { "a newer model" }
    personal = app.recommend(5)
    check(personal.basis == Basis.PERSONAL) { personal }
    val why = app.explain(personal.discover[0])
    check(why.item == personal.discover[0] && why.basis == Basis.PERSONAL) { why }
    check(why.because.isNotEmpty() && liked.containsAll(why.because.map { it.item })) { why }
    check(why.text.isNotEmpty()) { why }
    app.setDiversity(0.5f)
    check(app.recommend(5).discover.size == 5) { "diversified" }

    // The transparency report: record, text, JSON.
    val full = app.transparencyReport(true)
    check(full.consent.level == Consent.FEDERATED) { full.consent }
    check(full.stored.purchases == 7uL && full.stored.notUsed == 1uL) { full.stored }
    check(full.stored.encryptedFile && full.stored.items?.size == 7) { full.stored }
    check(full.exclusions.tags == 1uL) { full.exclusions }
    check(full.rounds.size == 2 && full.rounds.all { it.bytes > 0uL }) { full.rounds }
    check(full.totalBytesSent >= full.rounds.sumOf { it.bytes }) { full }
    val json = app.transparencyJson()
    check("\"purchases\": 7" in json) { json }

    // Forget me: the history goes, the settings stay.
    app.forgetMe()
    val after = app.transparencyReport(false)
    check(after.stored.purchases == 0uL && after.erasedAt != null) { after }
    check(app.recommend(5).basis == Basis.POPULAR_COLD_START) { "cold start" }
    app.close()

    // Reopened from its file, offline: the same state, and the catalogue.
    val again = FedrecClient.open(options(path), null)
    check(again.consent().level == Consent.FEDERATED) { again.consent() }
    check(again.itemIndex("1") == 0u && again.itemIndex((ITEMS + 1u).toString()) == null) { "catalogue" }
    again.record(Purchase(item = 12u, time = NOW, quantity = 1.0f))
    val offline = again.recommend(5)
    check(offline.discover.isEmpty() && offline.buyAgain == listOf(12u)) { offline }
    again.forgetMe()
    check(again.exclusions() == listOf(Exclusion.Tag(tag = "gift"))) { again.exclusions() }
    again.close()
    return path
}

fun badInput(path: String) {
    // A key of the wrong length, a wrong key, a corrupt file, a foreign file.
    expect<FedrecException.InvalidArgument>("a 31-byte key") {
        FedrecClient.open(options(path, KEY.copyOf(31)), null)
    }
    expect<FedrecException.WrongKey>("another key") {
        FedrecClient.open(options(path, ByteArray(32)), null)
    }
    val data = File(path).readBytes()
    data[data.size / 2] = (data[data.size / 2].toInt() xor 0xFF).toByte()
    val corrupt = File(DIR, "corrupt.store").apply { writeBytes(data) }
    expect<FedrecException.StoreCorrupt>("a corrupt store") {
        FedrecClient.open(options(corrupt.path), null)
    }
    val foreign = File(DIR, "foreign.store").apply { writeText("not a fedrec store at all\n".repeat(10)) }
    expect<FedrecException.StoreCorrupt>("a foreign file") {
        FedrecClient.open(options(foreign.path), null)
    }

    val app = FedrecClient.open(options(File(DIR, "fresh.store").path), null)
    expect<FedrecException.NotConnected>("participate before connect") { app.participate() }
    expect<FedrecException.NoModel>("explain before a model") { app.explain(1u) }
    app.setConsent(Consent.ON_DEVICE)
    expect<FedrecException.NoCatalogue>("record before connect") {
        app.record(Purchase(item = 1u, time = NOW, quantity = 1.0f))
    }
    check(app.recommend(5).discover.isEmpty()) { "empty rows before a model" }
    // A coordinator whose certificate another CA signed: refused, typed.
    val e = expect<FedrecException.CoordinatorUnreachable>("a wrong CA") {
        app.connect(TLS_ENDPOINT, ConnectConfig(caPem = OTHER_CA))
    }
    check("UnknownIssuer" in e.message!!) { e }
    expect<FedrecException.InvalidArgument>("half an identity") {
        app.connect(ENDPOINT, ConnectConfig(certPem = "x"))
    }
    app.connect(ENDPOINT, null)
    app.refreshModel()
    expect<FedrecException.InvalidArgument>("a negative k") { app.recommend(-1) }
    expect<FedrecException.InvalidArgument>("an unknown item") { app.explain(ITEMS + 1000u) }
    expect<FedrecException.InvalidArgument>("a purchase outside the catalogue") {
        app.record(Purchase(item = ITEMS, time = NOW, quantity = 1.0f))
    }
    expect<FedrecException.InvalidArgument>("a negative quantity") {
        app.record(Purchase(item = 1u, time = NOW, quantity = -1.0f))
    }
    expect<FedrecException.InvalidArgument>("a malformed tag") {
        app.exclude(Exclusion.Tag(tag = "no spaces allowed"))
    }
    expect<FedrecException.InvalidArgument>("diversity 2") { app.setDiversity(2.0f) }
    check(app.recommend(0).discover.isEmpty()) { "k = 0" }
    app.close()
}

fun main() {
    badInput(story())
    println("story: ok")
}
